"""The engine benchmark: one table of captioning and encoding speed and peak memory, ours against transformers
on identical random weights (written by `blip2.testing` through transformers' own save_pretrained).

    python benchmarks/engine_speed.py                                    # CPU, mid sizes, a few minutes
    python benchmarks/engine_speed.py --sizes mid-opt --batches 1 8 --new-tokens 20 30 --beam-batches 8
    python benchmarks/engine_speed.py --device cuda --dtype float16 --sizes opt-2.7b flan-t5-xl itm-vit-g \\
        --batches 1 64 --hf-compile --json-out results.json         # a GPU: the released sizes

Per size and batch: greedy decoding of exactly N new tokens for each N of --new-tokens (min = max, so random
weights cannot stop early and both engines do the same work), beam search (--beams, N = --beam-tokens),
and encode-only (vision tower + Q-Former + projection: the language model's image prefix; for a retrieval
size, the ITC image embeddings). Images are preprocessed already, except in the "files" rows
(--files-batches, ours only), which caption JPEG files through `Blip2.caption` with and without the decode
thread pool. Each cell is the best of --repeats timed calls after a warm-up (caption_speed.time_call).

Peak memory is what a call adds above what was held before it (the loaded weights): on CUDA
torch.cuda.max_memory_allocated over the timed calls; on CPU the peak resident set of one call (VmHWM, reset
through /proc/self/clear_refs) in a fresh process per cell (--skip-memory skips those: they take a while).
The "files" rows have no memory figure.
Rows: ours; ours with --quantize (passed to blip2.load when it takes quantize=); transformers eager; and
with --hf-compile on CUDA transformers with its static cache (which transformers compiles itself on CUDA).
The released sizes are refused on CPU: they would need hours and tens of GB there.
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import json
import multiprocessing
import platform
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from caption_speed import SIZES as CAPTION_SIZES
from caption_speed import _machine, hf_prompt_inputs, time_call
from match_speed import SIZES as RETRIEVAL_SIZES
from match_speed import TEXT, embed_hf, embed_ours

import blip2
from blip2.tasks import batch as batch_iteration
from blip2.tasks.captioning import make_options
from blip2.testing import build_checkpoint, build_retrieval_checkpoint

NUM_QUERY_TOKENS = 32
SIZES: dict[str, dict] = {
    **CAPTION_SIZES,
    **{f"{name}-itm" if name == "mid" else name: s for name, s in RETRIEVAL_SIZES.items()},
}
CPU_SIZES = ("mid-opt", "mid-t5", "mid-itm")
FILE_SIZE = (640, 480)  # the "files" rows' JPEGs: a typical photo, decoded and resized to 224 px


@dataclass
class Row:
    size: str
    engine: str
    workload: str
    batch: int
    images_per_s: float
    peak_mb: float | None  # None: not measured

    @property
    def seconds_per_image(self) -> float:
        return 1 / self.images_per_s


def is_retrieval(size: str) -> bool:
    return "lm" not in SIZES[size]


def write_checkpoint(size: str, root: Path) -> Path:
    """The random-weight checkpoint of `size` under `root`, written once (reused when already there)."""
    directory, spec = root / size, SIZES[size]
    if not (directory / "config.json").exists():
        shapes = dict(
            num_query_tokens=NUM_QUERY_TOKENS, vision=spec["vision"], qformer=spec["qformer"], std=0.02
        )
        if is_retrieval(size):
            build_retrieval_checkpoint(directory, **shapes)
        else:
            build_checkpoint(directory, spec["lm"], text=spec["text"], **shapes)
    return directory


# -- memory ----------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measured(fn: Callable[[], object], repeats: int, device: str) -> tuple[float, float | None]:
    """(best seconds of `fn`, on CUDA the peak MB it adds above what was allocated before it; on CPU None:
    see `peak_in_subprocess`)."""
    if not device.startswith("cuda"):
        return time_call(fn, repeats), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    seconds = time_call(fn, repeats)
    return seconds, (torch.cuda.max_memory_allocated() - before) / 2**20


def peak_rss_mb(fn: Callable[[], object]) -> float:
    """The peak resident set one call of `fn` adds above the resident set before it, in MB."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) / 1024


def peak_in_subprocess(directory: Path, size: str, engine: str, work: Workload, args) -> float:
    """CPU peak memory of one call, in a fresh process that loads only what the call needs: in the timing
    process, memory freed by earlier calls stays in the heap and would hide a later call's peak."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as child:
        return child.submit(cell_peak_mb, directory, size, engine, work, args).result()


def cell_peak_mb(directory: Path, size: str, engine: str, work: Workload, args) -> float:
    """(In the child process) load `engine` ("ours", "ours int8", "transformers") and measure `work` once."""
    ours = load_ours(directory, args, engine.split()[1] if engine.startswith("ours ") else None)
    pixels = pixels_for(ours, work.batch, args.device)
    if engine.startswith("ours"):
        return peak_rss_mb(ours_call(ours, work, pixels))
    return peak_rss_mb(hf_call(load_hf(directory, size, args), ours, work, pixels, static=False))


# -- the engines -------------------------------------------------------------------------------------------
def load_ours(directory: Path, args, quantize: str | None) -> object:
    kwargs = dict(device=args.device, dtype=args.dtype)
    if quantize:
        kwargs["quantize"] = quantize
    return blip2.load(directory, **kwargs)


def load_hf(directory: Path, size: str, args) -> torch.nn.Module:
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    model_class = Blip2ForImageTextRetrieval if is_retrieval(size) else Blip2ForConditionalGeneration
    dtype = blip2.loading.loader.parse_dtype(args.dtype, torch.device(args.device))
    return model_class.from_pretrained(directory, dtype=dtype).to(args.device).eval()


@dataclass(frozen=True)
class Workload:
    kind: str  # "greedy", "beam" or "encode"
    batch: int
    tokens: int = 0  # new tokens, exactly
    beams: int = 1

    @property
    def label(self) -> str:
        if self.kind == "encode":
            return "encode"
        return f"greedy {self.tokens}" if self.kind == "greedy" else f"beam {self.beams}, {self.tokens}"


def workloads(size: str, args) -> list[Workload]:
    """What to time at `size`: greedy and beam decoding (caption sizes) and encode-only."""
    encode = [Workload("encode", b) for b in args.encode_batches or args.batches]
    if is_retrieval(size):
        return encode
    greedy = [Workload("greedy", b, n) for b in args.batches for n in args.new_tokens]
    beam = [Workload("beam", b, args.beam_tokens, args.beams) for b in args.beam_batches or args.batches]
    return greedy + (beam if args.beams > 1 else []) + encode


def pixels_for(ours, batch: int, device: str) -> torch.Tensor:
    side = ours.image_config.size[0]
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(batch)).to(device)


def ours_call(ours, work: Workload, pixels: torch.Tensor) -> Callable[[], object]:
    """Our engine's call for `work` on preprocessed `pixels`."""
    if work.kind == "encode" and ours.config.text is None:
        return _inference(lambda: embed_ours(ours, pixels))
    if work.kind == "encode":
        return _inference(lambda: ours.encode(pixels))
    opts = make_options(dict(num_beams=work.beams, max_new_tokens=work.tokens, min_new_tokens=work.tokens))
    prompts = [""] * len(pixels)
    return _inference(lambda: ours.generate_ids(ours.encode(pixels), prompts, opts))


def hf_call(hf, ours, work: Workload, pixels: torch.Tensor, static: bool) -> Callable[[], object]:
    """transformers' call for `work` on the same pixels (in its dtype); `static`: with its static KV cache.
    `ours` lends its tokenizer (the same files)."""
    pixels = pixels.to(hf.dtype)
    if work.kind == "encode" and ours.config.text is None:
        text = ours.text.batch([TEXT] * len(pixels), "right")
        ids, mask = text.ids.to(pixels.device), text.mask.to(pixels.device)
        return _inference(lambda: embed_hf(hf, pixels, ids, mask))
    if work.kind == "encode":
        return _inference(lambda: hf.get_image_features(pixel_values=pixels))
    input_ids, mask = hf_prompt_inputs(ours, [""] * len(pixels), pixels.device)
    options: dict[str, object] = dict(
        do_sample=False, num_beams=work.beams, max_new_tokens=work.tokens, min_new_tokens=work.tokens
    )
    if static:
        options["cache_implementation"] = "static"
    return _inference(
        lambda: hf.generate(pixel_values=pixels, input_ids=input_ids, attention_mask=mask, **options)
    )


def _inference(fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        with torch.inference_mode():
            return fn()

    return call


def time_engine(size: str, directory: Path, engine: str, model, ours, args) -> list[Row]:
    """Time every workload of `size` on one engine: `model` is ours (engine "ours...") or transformers',
    loaded from `directory`; CPU peak memory (unless --skip-memory) in a fresh process per workload."""
    rows = []
    for work in workloads(size, args):
        pixels = pixels_for(ours, work.batch, args.device)
        if engine.startswith("ours"):
            fn = ours_call(model, work, pixels)
        else:
            fn = hf_call(model, ours, work, pixels, static="static" in engine)
        seconds, peak = measured(fn, args.repeats, args.device)
        if peak is None and not args.skip_memory:
            peak = peak_in_subprocess(directory, size, engine, work, args)
        rows.append(Row(size, engine, work.label, work.batch, work.batch / seconds, peak))
        print(
            f"  {engine:30s} {work.label:12s} batch {work.batch:3d}: {rows[-1].images_per_s:9.2f} img/s",
            flush=True,
        )
    return rows


# -- captioning image files, with and without the decode pool ------------------------------------------
def write_jpegs(root: Path, count: int) -> list[Path]:
    """`count` photo-sized JPEGs (smooth random colour fields with noise, so they compress like photos)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(
            FILE_SIZE, Image.Resampling.BILINEAR
        )
        noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 12, (*FILE_SIZE[::-1], 3))
        path = root / f"{i:05d}.jpg"
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def time_files(size: str, ours, args, root: Path) -> list[Row]:
    """Over two batches of JPEG files, with the decode pool (DECODE_WORKERS threads) and without it (0):
    `Blip2.caption`, greedy N = the first --new-tokens; and decoding alone (what the model would wait for
    without the pool)."""
    rows = []
    tokens = args.new_tokens[0]
    default_workers = batch_iteration.DECODE_WORKERS
    for batch in args.files_batches:
        paths = write_jpegs(root, 2 * batch)
        ours.batch_size = batch
        chunks = [paths[:batch], paths[batch:]]
        for workers in (default_workers, 0):
            batch_iteration.DECODE_WORKERS = workers
            calls = {
                f"files greedy {tokens}": functools.partial(
                    ours.caption, paths, num_beams=1, max_new_tokens=tokens, min_new_tokens=tokens
                ),
                "files decode only": functools.partial(decode_all, chunks, ours, workers),
            }
            for name, fn in calls.items():
                seconds, peak = measured(fn, args.repeats, args.device)
                label = f"{name}, {workers} decode threads"
                rows.append(Row(size, "ours", label, batch, len(paths) / seconds, peak))
                print(f"  ours {label}: batch {batch}: {len(paths) / seconds:.2f} img/s", flush=True)
    batch_iteration.DECODE_WORKERS = default_workers
    return rows


def decode_all(chunks: list[list[Path]], ours, workers: int) -> list:
    """Decode and preprocess every file of `chunks` as `Blip2.caption` does, with `workers` threads."""
    prepare = functools.partial(blip2.images.preprocess_one, config=ours.image_config)
    return list(batch_iteration.prepared_ahead(chunks, prepare, workers))


# -- the run ---------------------------------------------------------------------------------------------
def run_size(size: str, directory: Path, args, notes: list[str]) -> list[Row]:
    """Every row of one size: ours, ours quantized, transformers, transformers static + compile, files."""
    print(f"# {size}", flush=True)
    ours = load_ours(directory, args, None)
    if args.files_only:
        with tempfile.TemporaryDirectory() as root:
            return time_files(size, ours, args, Path(root))
    hf = load_hf(directory, size, args)
    rows = time_engine(size, directory, "ours", ours, ours, args)
    rows += time_engine(size, directory, "transformers", hf, ours, args)
    if args.hf_compile and args.device.startswith("cuda") and not is_retrieval(size):
        static_args = argparse.Namespace(**{**vars(args), "beams": 1})  # its static cache: greedy rows only
        rows += time_engine(size, directory, "transformers static cache + compile", hf, ours, static_args)
    if args.files_batches and not is_retrieval(size):
        with tempfile.TemporaryDirectory() as root:
            rows += time_files(size, ours, args, Path(root))
    del hf
    if args.quantize:
        if "quantize" in inspect.signature(blip2.load).parameters:
            quantized = load_ours(directory, args, args.quantize)
            rows += time_engine(size, directory, f"ours {args.quantize}", quantized, ours, args)
        else:
            notes.append(f"--quantize {args.quantize}: blip2.load takes no quantize= here; no quantized rows")
    return rows


def markdown(rows: list[Row]) -> str:
    """The table, each row's speed also as a ratio to transformers eager on the same workload."""
    eager = {(r.size, r.workload, r.batch): r.images_per_s for r in rows if r.engine == "transformers"}
    lines = [
        "| size | engine | workload | batch | images/s | s/image | peak MB | vs transformers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = eager.get((r.size, r.workload, r.batch))
        ratio = f"{r.images_per_s / base:.2f}x" if base else ""
        lines.append(
            f"| {r.size} | {r.engine} | {r.workload} | {r.batch} | {r.images_per_s:.2f} | "
            f"{r.seconds_per_image:.3f} | {'' if r.peak_mb is None else f'{r.peak_mb:.0f}'} | {ratio} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=list(CPU_SIZES))
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[1, 8, 64], help="greedy (and default) batches"
    )
    parser.add_argument(
        "--new-tokens", type=int, nargs="+", default=[30], help="greedy: exactly N new tokens"
    )
    parser.add_argument("--beams", type=int, default=5, help="beam search width (1: no beam rows)")
    parser.add_argument("--beam-tokens", type=int, default=30)
    parser.add_argument("--beam-batches", type=int, nargs="+", help="default: --batches")
    parser.add_argument("--encode-batches", type=int, nargs="+", help="default: --batches")
    parser.add_argument("--files-batches", type=int, nargs="*", default=[], help="caption JPEG files (ours)")
    parser.add_argument("--files-only", action="store_true", help="only the --files-batches rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls after one warm-up; the best counts"
    )
    parser.add_argument("--quantize", help="passed to blip2.load(quantize=) when it takes it (int8, int4)")
    parser.add_argument(
        "--hf-compile", action="store_true", help="CUDA: also transformers' static cache + compile"
    )
    parser.add_argument(
        "--checkpoint-dir", type=Path, help="where the random checkpoints are written / reused"
    )
    parser.add_argument("--skip-memory", action="store_true", help="CPU: no peak-memory subprocesses")
    parser.add_argument("--json-out", type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    notes: list[str] = []
    cpu = not args.device.startswith("cuda")
    if args.hf_compile and cpu:
        notes.append(
            "--hf-compile: transformers compiles its static-cache decode step on CUDA only; no such rows"
        )
    if args.dtype == "float16" and any(SIZES[s].get("lm") == "t5" for s in args.sizes):
        notes.append(
            "T5 sizes in float16: ours keeps the T5 language model in bfloat16 (T5 overflows in float16)"
        )
    import transformers

    machine = f"{_machine(args.device)}, {platform.platform()}"
    print(
        f"# {args.device} {args.dtype}: {machine}, torch {torch.__version__}, transformers {transformers.__version__}"
    )
    root = args.checkpoint_dir or Path(tempfile.mkdtemp(prefix="blip2-bench-"))
    rows: list[Row] = []
    for size in args.sizes:
        if cpu and size not in CPU_SIZES:
            notes.append(f"{size}: not run on CPU (hours per row and tens of GB); run it on a GPU")
            continue
        rows += run_size(size, write_checkpoint(size, root), args, notes)
        gc.collect()
        if not cpu:
            torch.cuda.empty_cache()
    print()
    print(markdown(rows))
    for note in notes:
        print(f"\nNote: {note}")
    if args.json_out:
        meta = dict(
            machine=machine,
            torch=torch.__version__,
            transformers=transformers.__version__,
            args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            notes=notes,
        )
        records = [{**asdict(r), "seconds_per_image": r.seconds_per_image} for r in rows]
        args.json_out.write_text(json.dumps({**meta, "rows": records}, indent=1))


if __name__ == "__main__":
    main()
