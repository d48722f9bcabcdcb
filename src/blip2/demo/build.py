"""`python -m blip2.demo.build OUT`: rebuild the demo checkpoints from nothing, with blip2's training code.

1. `OUT/data`: `--count` training scenes (images, captions.jsonl, vqa.jsonl, shapes.jsonl, counts.jsonl,
   colors.jsonl, queries.jsonl: see make_data); images already there are kept, the texts always rewritten;
2. `OUT/tokenizers`: the two tokenizers, trained on the scenes' texts (see model.py);
3. `OUT/init/demo-itm`, `OUT/init/demo`: fresh random checkpoints in the Hugging Face layout
   (`blip2.train.new_checkpoint`) of the shapes in model.py;
4. five training runs, in order (why: the YAMLs' comments): `warmup.yaml` (stage 2 on shape questions alone,
   every part from scratch: it teaches the vision tower shapes), `counting.yaml` (shape and count questions:
   it teaches it to count) and `binding.yaml` (shape, count and colour questions: a colour bound to its
   shape), these two with a fresh Q-Former and language model over the tower of the run before;
   `stage1.yaml` (ITC + ITM + ITG from binding's vision tower and Q-Former, the tower training) and
   `stage2.yaml` (the language-model loss on captions and questions, a fresh language model over stage 1's
   Q-Former and tower, frozen). Each YAML is copied into OUT with the overrides given here, so that OUT holds
   the exact configs of the build; the runs are in `OUT/runs/<run>`; `--from RUN` reruns RUN and the ones
   after it over an earlier build in OUT;
5. unless `--no-install`, the two exports are copied into the package (blip2/demo/weights/demo-itm and
   demo), where `blip2.load("demo")` and `blip2.load("demo-itm")` find them.

Needs the `train` extra (pyyaml). Every run uses two CPU threads (the YAMLs' `threads: 2`): on an idle 2-core
machine the defaults took 26.3 minutes (session 9: prepare 52 s, warm-up 214 s, counting 127 s, binding 138 s,
stage 1 714 s, stage 2 331 s; peak RSS 0.6 GB). `--threads 1` (every run on one core) suits a machine whose
other core is busy: 49 minutes in session 8, one core busy, with other weights (another float summation
order). Each run starts from the one before, so `--jobs` has nothing to run side by side in the default
recipe. The runs are seeded and deterministic on the CPU: two default builds gave weights bitwise equal to
the shipped ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from ..errors import InputError
from . import make_data, model

HERE = Path(__file__).parent
WEIGHTS = HERE / "weights"
SAMPLE_FOLDER = HERE / "samples"
SAMPLES = (0, 1)  # held-out scenes shipped as PNGs for the quickstart: samples/scene-N.png
# The training runs in the order they run, each starting from the output of the one before (the YAMLs say
# why); a run's name is its YAML's stem and its folder under OUT/runs.
RUNS = ("warmup", "counting", "binding", "stage1", "stage2")
# The checkpoints the build ships, by the run that exports them.
EXPORTS = {"demo": "stage2", "demo-itm": "stage1"}
# What a checkpoint directory ships (the training export may hold more, e.g. a training log).
SHIPPED = ("*.json", "*.safetensors")


def has_data(folder: Path, count: int) -> bool:
    """Whether `folder` already holds the images of the first `count` training scenes (a rebuild in the same OUT
    reuses them: they are a pure function of the index; `write_data` rewrites their texts)."""
    truths = folder / "scenes.jsonl"
    if not truths.is_file():
        return False
    with open(truths) as f:
        rows = [json.loads(line) for line in f]
    if [(r["split"], r["index"]) for r in rows] != [("train", i) for i in range(count)]:
        return False
    return all((folder / f"images/{i:06d}.png").is_file() for i in range(count))


def write_data(folder: Path, count: int) -> None:
    """The training scenes of a build: their images unless `folder` has them, and always their JSONL files, so
    that a build over an earlier one (or `--from RUN`) trains on the texts today's recipe draws (a few seconds
    for 20,000 scenes), never on an older recipe's."""
    make_data.write(folder, "train", count, questions=2, images=not has_data(folder, count))


def write_tokenizers(out: Path, scenes: int = 3000) -> dict[str, Path]:
    """OUT/opt (the language model's) and OUT/qformer (the Q-Former's) tokenizer folders."""
    lines = model.corpus(scenes)
    return {
        "opt": model.write_tokenizer(out / "opt", model.opt_tokenizer(lines), model.OPT_TOKENIZER_CONFIG),
        "qformer": model.write_tokenizer(
            out / "qformer", model.qformer_tokenizer(lines), model.BERT_TOKENIZER_CONFIG
        ),
    }


def fresh_checkpoints(out: Path, tokenizers: dict[str, Path], seed: int = 0) -> dict[str, Path]:
    """Random checkpoints of the demo's shapes: OUT/demo-itm (retrieval) and OUT/demo (captioning)."""
    from tokenizers import Tokenizer

    from ..train import new_checkpoint

    opt = Tokenizer.from_file(str(tokenizers["opt"] / "tokenizer.json"))
    newline = opt.token_to_id(
        "Ċ"
    )  # "\n", the language model's end of text (byte-level: every byte is a token)
    assert newline is not None
    qformer = Tokenizer.from_file(str(tokenizers["qformer"] / "tokenizer.json"))
    configs = {
        "demo-itm": (model.retrieval_config(qformer.get_vocab_size()), tokenizers["qformer"]),
        "demo": (model.caption_config(opt.get_vocab_size(), newline), tokenizers["opt"]),
    }
    for name, (config, tokenizer) in configs.items():
        new_checkpoint(out / name, config, tokenizer, model.IMAGE_PROCESSOR, seed=seed)
    return {name: out / name for name in configs}


def run_config(run: str, out: Path, overrides: dict[str, Any]) -> Path:
    """Copy run `run`'s YAML (one of RUNS) into OUT with `overrides` applied; return the copy's path."""
    import yaml  # type: ignore[import-untyped]

    source = HERE / f"{run}.yaml"
    config = yaml.safe_load(source.read_text())
    config.update(overrides)
    path = out / source.name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def starts(out: Path, paths: dict[str, Path]) -> dict[str, set[str]]:
    """For each run (its copied YAML in `paths`), the runs among `paths` whose output it starts from (its
    `model` or `init_from`)."""
    from ..train import load_config

    outputs = {out / "runs" / run / "output": run for run in paths}
    found = {}
    for run, path in paths.items():
        config = load_config(path)
        found[run] = {outputs[p] for p in (config.model, config.init_from) if p in outputs}
    return found


def ready(starts: dict[str, set[str]], done: set[str], started: set[str]) -> list[str]:
    """The runs not yet started whose starts have all trained, in their order."""
    return [run for run, needs in starts.items() if run not in started and needs <= done]


def train_all(paths: dict[str, Path], starts: dict[str, set[str]], jobs: int) -> dict[str, float]:
    """Train every run of `paths` (run -> its copied YAML) after the runs it starts from; with `jobs` > 1, in up
    to `jobs` processes at once, each run as soon as its starts are done. Returns each run's wall time. A run
    that waits on itself or on a run that never trains is an InputError."""
    times: dict[str, float] = {}

    def stuck() -> InputError:
        return InputError(f"the runs {', '.join(r for r in paths if r not in times)} wait on each other")

    if jobs == 1:
        while len(times) < len(paths):
            runnable = ready(starts, set(times), set(times))
            if not runnable:
                raise stuck()
            times[runnable[0]] = train_timed(paths[runnable[0]])
        return times
    # One process per run, one thread each (as the YAMLs say); progress bars from several processes would
    # overwrite each other, so each run says when it starts and ends instead.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        running: dict[Future[float], str] = {}
        while len(times) < len(paths):
            for run in ready(starts, set(times), set(times) | set(running.values())):
                print(f"{run}: training", flush=True)
                running[pool.submit(train_timed, paths[run], False)] = run
            if not running:
                raise stuck()
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                run = running.pop(future)
                times[run] = future.result()
                print(f"{run}: {times[run]:.0f} s", flush=True)
    return times


def train_timed(config: Path, progress: bool = True) -> float:
    """Train the run of the YAML at `config`; its wall time in seconds."""
    from ..train import load_config
    from ..train.loop import run_training

    start = time.perf_counter()
    settings = load_config(config)
    run_training(settings if progress else dataclasses.replace(settings, progress=False))
    return time.perf_counter() - start


def check_earlier_runs(out: Path, count: int, start_at: str) -> None:
    """What a build from `start_at` needs of an earlier build in `out`: its data, fresh checkpoints and the
    outputs of the runs before `start_at`; a missing one is an InputError that names it."""
    if start_at not in RUNS:
        raise InputError(f"--from: {start_at!r} is not one of the runs ({', '.join(RUNS)})")
    needed = [out / "init" / "demo", out / "init" / "demo-itm"]
    needed += [out / "runs" / run / "output" for run in RUNS[: RUNS.index(start_at)]]
    missing = [str(path) for path in needed if not path.is_dir()]
    if not has_data(out / "data", count):
        missing.insert(0, f"{out / 'data'} ({count} scenes)")
    if missing:
        raise InputError(f"--from {start_at}: {out} lacks what the earlier runs write: {', '.join(missing)}")


def install(export: Path, name: str) -> Path:
    """Replace blip2/demo/weights/NAME with the shipped files of a training export."""
    target = WEIGHTS / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for pattern in SHIPPED:
        for file in export.glob(pattern):
            shutil.copy2(file, target / file.name)
    return target


def write_samples() -> list[Path]:
    """blip2/demo/samples/scene-N.png: the held-out scenes of SAMPLES."""
    from . import scenes

    SAMPLE_FOLDER.mkdir(exist_ok=True)
    paths = [SAMPLE_FOLDER / f"scene-{i}.png" for i in SAMPLES]
    for i, path in zip(SAMPLES, paths):
        scenes.render(scenes.scene("heldout", i)).save(path)
    return paths


def build(
    out: Path,
    count: int = 20000,
    overrides: dict[str, dict[str, Any]] | None = None,
    install_weights: bool = True,
    start_at: str | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Every step of the module docstring; `overrides` maps a run's name to fields of its YAML to replace.
    `start_at` (one of RUNS) reruns that run and the ones after it over an earlier build in OUT: their folders
    under OUT/runs are replaced, the earlier runs' outputs, the scenes' images, tokenizers and fresh checkpoints
    are kept (the scenes' texts are written again).
    With `jobs` > 1, runs that start from nothing of each other train at the same time, in up to `jobs`
    processes (none in the default recipe, a chain). Returns the wall time of each step (seconds)."""
    runs = RUNS[RUNS.index(start_at) :] if start_at is not None else RUNS
    if start_at is not None:
        check_earlier_runs(out, count, start_at)
        for run in runs:
            shutil.rmtree(out / "runs" / run, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, Any] = {}
    start = time.perf_counter()
    write_data(out / "data", count)  # today's texts, over an earlier build too
    if start_at is None:
        tokenizers = write_tokenizers(out / "tokenizers")
        fresh_checkpoints(out / "init", tokenizers)
        times["prepare"] = time.perf_counter() - start
    paths = {run: run_config(run, out, (overrides or {}).get(run, {})) for run in runs}
    times.update(train_all(paths, starts(out, paths), jobs))
    if install_weights:
        for name, run in EXPORTS.items():
            install(out / "runs" / run / "output", name)
        write_samples()
    (out / "build.json").write_text(json.dumps({"count": count, "seconds": times}, indent=2) + "\n")
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m blip2.demo.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the work folder (data, checkpoints, runs)")
    parser.add_argument("--count", type=int, default=20000, help="training scenes (default 20000)")
    parser.add_argument("--steps-warmup", type=int, help="warm-up steps (default: warmup.yaml's)")
    parser.add_argument("--steps-counting", type=int, help="counting steps (default: counting.yaml's)")
    parser.add_argument("--steps-binding", type=int, help="binding steps (default: binding.yaml's)")
    parser.add_argument("--steps2", type=int, help="stage 2 steps (default: stage2.yaml's)")
    parser.add_argument("--steps1", type=int, help="stage 1 steps (default: stage1.yaml's)")
    parser.add_argument("--no-install", action="store_true", help="leave the package's weights as they are")
    parser.add_argument(
        "--from",
        dest="start_at",
        choices=RUNS,
        help="rerun this run and the ones after it over an earlier build in OUT (their run folders are replaced)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train up to this many runs at once where they do not start from each other, one core each "
        "(default 1; the default recipe is a chain: each run starts from the one before)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads per run (default: the YAMLs' 2, which built the shipped weights in 26 minutes on an "
        "idle 2-core machine). 1 on a machine whose other core is busy: slower, and weights that differ from "
        "the shipped ones (another float summation order)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    steps = {
        "warmup": args.steps_warmup,
        "counting": args.steps_counting,
        "binding": args.steps_binding,
        "stage2": args.steps2,
        "stage1": args.steps1,
    }
    overrides = {
        run: {field: v for field, v in (("steps", steps[run]), ("threads", args.threads)) if v is not None}
        for run in RUNS
    }
    try:
        times = build(args.out, args.count, overrides, not args.no_install, args.start_at, args.jobs)
    except InputError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(json.dumps({"seconds": times}, indent=2))


if __name__ == "__main__":
    main()
