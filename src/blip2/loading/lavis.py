"""Convert a BLIP-2 checkpoint fine-tuned with Salesforce LAVIS (a .pth file) into a Hugging Face-layout
directory that `blip2.load` reads.

A LAVIS training run saves `{"model": state_dict, "optimizer": ..., "config": ..., "scaler": ..., "epoch": ...}`
(`RunnerBase._save_checkpoint`) and drops every frozen parameter from the state dict: what is left is what was
trained, usually the Q-Former, the query tokens, `ln_vision` and the language projection (`opt_proj`,
`t5_proj` or `llm_proj`); the frozen ViT and language model come from their original releases. So the
conversion overlays the .pth on a released base checkpoint (`--base`): the base's tensors, with those the
.pth holds replaced, renamed by the key map below.

Only torch's weights-only loader reads the .pth: a pickle that would run code is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError, InputError
from ..files import read_json
from .weights import HF_KEY_RULES, checkpoint_files, read_tensors, rename

_LAYER = r"^Qformer\.bert\.encoder\.layer\.(\d+)\."
_BLOCK = r"^visual_encoder\.blocks\.(\d+)\."
_PARAM = r"(weight|bias)$"

# LAVIS key -> our key, as data: (regex, replacement). Every key of a .pth must match a rule here or in
# LAVIS_DROPPED, else it is reported as unknown. Names are from LAVIS's Qformer.py (BERT), eva_vit.py and the
# blip2_*.py model classes; ours are the Hugging Face checkpoint's, after `weights.HF_KEY_RULES`.
LAVIS_KEY_RULES: list[tuple[str, str]] = [
    (r"^query_tokens$", "query_tokens"),
    # LAVIS applies its LayerNorm after the ViT (`ln_vision`); the Hugging Face model keeps it in the tower.
    (r"^ln_vision\." + _PARAM, r"vision_model.post_layernorm.\1"),
    # Q-Former (BERT names): the embeddings' LayerNorm normalises the query tokens (and any text).
    (r"^Qformer\.bert\.embeddings\.LayerNorm\." + _PARAM, r"qformer.layernorm.\1"),
    (r"^Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.weight$", r"embeddings.\1.weight"),
    (
        _LAYER + r"(attention|crossattention)\.self\.(query|key|value)\." + _PARAM,
        r"qformer.encoder.layer.\1.\2.attention.\3.\4",
    ),
    (
        _LAYER + r"(attention|crossattention)\.output\.(dense|LayerNorm)\." + _PARAM,
        r"qformer.encoder.layer.\1.\2.output.\3.\4",
    ),
    (
        _LAYER + r"(intermediate|intermediate_query)\.dense\." + _PARAM,
        r"qformer.encoder.layer.\1.\2.dense.\3",
    ),
    (_LAYER + r"(output|output_query)\.(dense|LayerNorm)\." + _PARAM, r"qformer.encoder.layer.\1.\2.\3.\4"),
    # Heads: the language projection of each LAVIS model class, and the stage-1 ITC / ITM heads.
    (r"^(?:opt|t5|llm)_proj\." + _PARAM, r"language_projection.\1"),
    (r"^vision_proj\." + _PARAM, r"vision_projection.\1"),
    (r"^text_proj\." + _PARAM, r"text_projection.\1"),
    (r"^itm_head\." + _PARAM, r"itm_head.\1"),
    # The EVA ViT-g, present only when it was not frozen (q_bias / v_bias are fused first, see fuse_qv_bias).
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\." + _PARAM, r"vision_model.embeddings.patch_embedding.\1"),
    (_BLOCK + r"norm([12])\." + _PARAM, r"vision_model.encoder.layers.\1.layer_norm\2.\3"),
    (_BLOCK + r"attn\.qkv\." + _PARAM, r"vision_model.encoder.layers.\1.self_attn.qkv.\2"),
    (_BLOCK + r"attn\.proj\." + _PARAM, r"vision_model.encoder.layers.\1.self_attn.projection.\2"),
    (_BLOCK + r"mlp\.(fc1|fc2)\." + _PARAM, r"vision_model.encoder.layers.\1.mlp.\2.\3"),
    # The language model, present only when it was not frozen: transformers' own names under another prefix.
    (r"^(?:opt_model|t5_model|llm_model)\.(.+)$", r"language_model.\1"),
]

# LAVIS keys with no place in the converted checkpoint, and why: (regex, reason).
LAVIS_DROPPED: list[tuple[str, str]] = [
    (r"^temp$", "the ITC softmax temperature, used only by the pre-training loss"),
    (
        r"^Qformer\.cls\.",
        "the Q-Former's language-modelling head, used only by the pre-training captioning loss",
    ),
    (r"^Qformer\.bert\.embeddings\.position_ids$", "a buffer of position indices, rebuilt by the model"),
    (r"^llm_model\..*rotary_emb\.inv_freq$", "a buffer of rotary frequencies, rebuilt from the config"),
]

# The base's files besides its weights that a checkpoint directory needs (at its top and in qformer_tokenizer/).
AUXILIARY_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "tokenizer.model",
)
AUXILIARY_DIRS = ("qformer_tokenizer",)

MAX_SHARD_BYTES = 2 * 1024**3  # a shard is assembled in memory before it is written

# The language projection names the LAVIS model class (and with it the base's language model).
PROJECTIONS = {"opt_proj.weight": "opt", "t5_proj.weight": "t5", "llm_proj.weight": "llama"}
LAVIS_CLASSES = {
    ("blip-2", "opt"): "blip2_opt",
    ("blip-2", "t5"): "blip2_t5",
    ("instructblip", "t5"): "blip2_t5_instruct",
    ("instructblip", "llama"): "blip2_vicuna_instruct",
    ("retrieval", None): "blip2 (Blip2Qformer, stage 1: ITC / ITM)",
}


@dataclass(frozen=True)
class Variant:
    """What a checkpoint is: `kind` is "blip-2", "instructblip" or "retrieval"; `language_model` is "opt",
    "t5", "llama" or None."""

    kind: str
    language_model: str | None

    def __str__(self) -> str:
        lavis = LAVIS_CLASSES.get((self.kind, self.language_model))
        return lavis or f"{self.kind} with {self.language_model or 'no language model'}"


def detect_variant(keys: Iterable[str]) -> Variant:
    """The LAVIS model a state dict comes from, by its keys: the projection names the language model, and a
    Q-Former that keeps its word embeddings reads text (InstructBLIP); ITC / ITM heads without a projection
    are the stage-1 model."""
    keys = set(keys)
    if any(k.startswith(("qformer.", "vision_model.", "language_projection.")) for k in keys):
        raise CheckpointError(
            "its keys are Hugging Face names (qformer.*, vision_model.*), not LAVIS ones: this is a Hugging Face "
            "checkpoint, which blip2 loads directly"
        )
    if not any(k.startswith("Qformer.") or k == "query_tokens" for k in keys):
        raise CheckpointError("no Q-Former or query tokens under LAVIS names (Qformer.*, query_tokens)")
    language_models = [lm for key, lm in PROJECTIONS.items() if key in keys]
    if len(language_models) > 1:
        raise CheckpointError(f"more than one language projection: {', '.join(sorted(PROJECTIONS))}")
    if language_models:
        reads_text = "Qformer.bert.embeddings.word_embeddings.weight" in keys
        return Variant("instructblip" if reads_text else "blip-2", language_models[0])
    if "itm_head.weight" in keys or "vision_proj.weight" in keys:
        return Variant("retrieval", None)
    raise CheckpointError(
        "no language projection (opt_proj, t5_proj, llm_proj) and no ITC / ITM heads (vision_proj, itm_head): "
        "cannot tell which model it is for"
    )


def base_variant(raw_config: dict) -> Variant:
    """What a Hugging Face checkpoint is, from its config.json."""
    from .loader import is_retrieval

    if is_retrieval(raw_config):
        return Variant("retrieval", None)
    kind = "instructblip" if raw_config.get("model_type") == "instructblip" else "blip-2"
    return Variant(kind, (raw_config.get("text_config") or {}).get("model_type", "opt"))


# -- named tensor fixes ---------------------------------------------------------------------------------------
def fuse_qv_bias(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """EVA's attention has q and v biases and no k bias; the Hugging Face ViT has one qkv bias with zeros for k
    (as transformers' conversion script builds it). Each block's `attn.q_bias` + `attn.v_bias` become
    `attn.qkv.bias`; one without the other is an error."""
    out = {k: v for k, v in state.items() if not re.search(_BLOCK + r"attn\.[qv]_bias$", k)}
    for prefix in sorted({key[: -len("q_bias")] for key in state.keys() - out.keys()}):
        q, v = state.get(prefix + "q_bias"), state.get(prefix + "v_bias")
        if q is None or v is None:
            present, absent = ("q_bias", "v_bias") if v is None else ("v_bias", "q_bias")
            raise CheckpointError(f"{prefix}{present} has no {absent} beside it")
        out[prefix + "qkv.bias"] = torch.cat([q, torch.zeros_like(v), v])
    return out


TENSOR_FIXES = [fuse_qv_bias]


# -- the key map ----------------------------------------------------------------------------------------------
def lavis_name(key: str) -> tuple[str | None, str | None]:
    """(our key, None) for a LAVIS key the map knows, (None, reason) for one it drops; unknown keys raise."""
    for pattern, reason in LAVIS_DROPPED:
        if re.search(pattern, key):
            return None, reason
    for pattern, replacement in LAVIS_KEY_RULES:
        if re.search(pattern, key):
            ours = rename(re.sub(pattern, replacement, key), HF_KEY_RULES)
            if ours is None:
                return None, "an alias or buffer that the model does not load"
            return ours, None
    raise CheckpointError(
        f"unknown LAVIS key {key!r}: it matches no rule of the key map (blip2.loading.lavis)"
    )


@dataclass(frozen=True)
class BaseTensor:
    key: str  # the name in the base's files
    shape: tuple[int, ...]
    floating: bool


def map_state(
    state: dict[str, Tensor], base: dict[str, BaseTensor]
) -> tuple[dict[str, Tensor], list[tuple[str, str]]]:
    """LAVIS tensors -> ({base key: tensor}, [(dropped LAVIS key, reason)]). `base` is indexed by our key.
    Every kept tensor must exist in the base with the same shape."""
    for fix in TENSOR_FIXES:
        state = fix(state)
    mapped: dict[str, Tensor] = {}
    dropped: list[tuple[str, str]] = []
    sources: dict[str, str] = {}  # base key -> the LAVIS key it comes from
    for key, tensor in state.items():
        ours, reason = lavis_name(key)
        if ours is None:
            dropped.append((key, reason or ""))
            continue
        target = base.get(ours)
        if target is None:
            raise CheckpointError(f"{key} (as {ours}) has no counterpart in the base checkpoint")
        if tuple(tensor.shape) != target.shape or tensor.is_floating_point() != target.floating:
            raise CheckpointError(
                f"{key}: shape {tuple(tensor.shape)} ({tensor.dtype}) does not fit {target.key} of the base, "
                f"shape {target.shape}"
            )
        if target.key in sources:
            raise CheckpointError(f"{sources[target.key]} and {key} both map to {target.key}")
        mapped[target.key], sources[target.key] = tensor, key
    return mapped, dropped


# -- reading ----------------------------------------------------------------------------------------------------
def read_lavis_state(path: Path) -> dict[str, Tensor]:
    """The state dict of a LAVIS .pth, read with torch's weights-only loader (memory-mapped: the optimizer
    state next to it costs no memory)."""
    if not path.is_file():
        raise CheckpointError(
            f"{path}: {'a directory, not a .pth file' if path.is_dir() else 'no such file'}"
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # whatever the unpickler or the zip reader says, the file is refused
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint that torch's weights-only loader accepts ({reason})"
        ) from None
    state = saved.get("model", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not state:
        raise CheckpointError(
            f"{path}: holds no state dict ({{'model': ...}} as LAVIS saves it, or a bare one)"
        )
    bad = [repr(k)[:80] for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: entries of its state dict that are not named tensors: {', '.join(bad[:8])}"
        )
    return state


def _allowed_root(directory: Path) -> Path:
    """Where a base's files may live: its directory, or for a Hugging Face cache snapshot (whose files are
    links into ../../blobs) the cached repository's folder."""
    directory = directory.resolve()
    return directory.parent.parent if directory.parent.name == "snapshots" else directory


def _confined(path: Path, root: Path) -> Path:
    """`path` itself (its name tells the format; a cache blob's does not), once it is known to lead into root."""
    if not path.resolve().is_relative_to(root):
        raise CheckpointError(f"{path} points outside the base checkpoint ({root})")
    return path


def base_weight_files(directory: Path) -> list[Path]:
    root = _allowed_root(directory)
    return [_confined(f, root) for f in checkpoint_files(directory)]


def base_index(files: list[Path]) -> dict[str, BaseTensor]:
    """The base's tensors by our key; safetensors are indexed from their headers, without reading data."""
    from safetensors import safe_open

    index = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                entries = [
                    (k, tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()
                ]
            infos = [BaseTensor(k, s, d.startswith(("F", "BF"))) for k, s, d in entries]
        else:
            infos = [
                BaseTensor(k, tuple(t.shape), t.is_floating_point())
                for k, t in read_tensors([file], torch.device("cpu"))
            ]
        for info in infos:
            ours = rename(info.key, HF_KEY_RULES)
            if ours is not None:
                index[ours] = info
    return index


# -- writing ----------------------------------------------------------------------------------------------------
def copy_auxiliary_files(base: Path, out: Path) -> list[str]:
    """Copy the base's config, tokenizer and processor files (regular files with known names only)."""
    root = _allowed_root(base)
    copied = []
    for folder in ("", *AUXILIARY_DIRS):
        for name in AUXILIARY_FILES:
            source = base / folder / name
            if not source.is_file():
                continue
            (out / folder).mkdir(exist_ok=True)
            shutil.copyfile(_confined(source, root), out / folder / name)
            copied.append(str(Path(folder) / name))
    return copied


def write_safetensors(tensors: Iterator[tuple[str, Tensor]], out: Path, max_shard_bytes: int) -> list[str]:
    """Write tensors as model.safetensors, or as shards of at most `max_shard_bytes` (one tensor may exceed
    it) with model.safetensors.index.json, as save_pretrained does. Returns the file names."""
    from safetensors.torch import save_file

    parts: list[dict[str, str]] = []
    shard: dict[str, Tensor] = {}
    size = total = 0

    def flush() -> None:
        name = f"part-{len(parts):05d}.tmp"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        parts.append({key: name for key in shard})

    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[key] = tensor.detach().clone()  # own storage: a .pth may share it between tensors
        size += nbytes
        total += nbytes
    flush()
    if len(parts) == 1:
        os.replace(out / "part-00000.tmp", out / "model.safetensors")
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    for i, name in enumerate(names):
        os.replace(out / f"part-{i:05d}.tmp", out / name)
    weight_map = {key: names[i] for i, part in enumerate(parts) for key in part}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [*names, "model.safetensors.index.json"]


def _check_out(out: Path, base: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    if out.resolve() == base.resolve():
        raise InputError(f"--out {out}: is the base checkpoint itself")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise InputError(f"--out {out}: exists and is not empty (pass --force to replace it)")
        if not (out / "config.json").is_file():
            raise InputError(
                f"--out {out}: --force replaces only a checkpoint directory (one with config.json)"
            )


def _publish(tmp: Path, out: Path) -> None:
    """Put the finished directory in place: the old one (empty, or replaced with --force) goes only then."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old)


# -- the conversion --------------------------------------------------------------------------------------------
@dataclass
class ConversionReport:
    """What `convert_lavis` did: the LAVIS keys used, the base keys they replaced, those dropped and why,
    and the base keys kept as they were."""

    checkpoint: str
    base: str
    out: str
    variant: str
    converted: int  # LAVIS keys whose tensors were written (q_bias + v_bias count as two)
    overridden: list[str] = field(default_factory=list)  # base keys replaced
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (LAVIS key, reason)
    kept: int = 0  # base keys written unchanged
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"converted {self.checkpoint} ({self.variant}) onto {self.base}: {len(self.overridden)} base tensors "
            f"replaced by {self.converted} LAVIS tensors, {self.kept} kept from the base, "
            f"{len(self.dropped)} LAVIS keys dropped; wrote {self.out}"
        )

    def dropped_note(self) -> str:
        """One line per reason: how many keys were dropped and a few of their names."""
        by_reason: dict[str, list[str]] = {}
        for key, reason in self.dropped:
            by_reason.setdefault(reason, []).append(key)
        return "\n".join(
            f"dropped {len(keys)} key(s) ({reason}): {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for reason, keys in by_reason.items()
        )

    def to_dict(self) -> dict:
        return {
            "checkpoint": self.checkpoint,
            "base": self.base,
            "out": self.out,
            "variant": self.variant,
            "converted": self.converted,
            "overridden": self.overridden,
            "dropped": [{"key": k, "reason": r} for k, r in self.dropped],
            "kept": self.kept,
            "files": self.files,
        }


def convert_lavis(
    checkpoint: Path,
    base: str | Path,
    out: Path,
    *,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> ConversionReport:
    """Write `out`: the base checkpoint (a directory or Hub repo id, in the Hugging Face layout) with the tensors
    of the LAVIS .pth `checkpoint` in place of its own, as safetensors, with the base's config, tokenizer and
    processor files. The directory appears complete or not at all (it is written beside `out` and renamed)."""
    from .hub import resolve

    checkpoint, out = Path(checkpoint), Path(out)
    state = read_lavis_state(checkpoint)
    variant = detect_variant(state)
    base_dir = resolve(base)
    _check_out(out, base_dir, force)
    _check_fits(variant, base_dir)
    files = base_weight_files(base_dir)
    mapped, dropped = map_state(state, base_index(files))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    base_keys: list[str] = []

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for key, tensor in read_tensors(files, torch.device("cpu")):
            base_keys.append(key)
            yield key, mapped.get(key, tensor)

    try:
        written = copy_auxiliary_files(base_dir, tmp)
        written += write_safetensors(tensors(), tmp, max_shard_bytes)
        _publish(tmp, out)
    except BaseException:  # leave nothing half-written behind, then let the error through
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConversionReport(
        checkpoint=str(checkpoint),
        base=str(base),
        out=str(out),
        variant=str(variant),
        converted=len(state) - len(dropped),
        overridden=sorted(mapped),
        dropped=dropped,
        kept=len(base_keys) - len(mapped),
        files=written,
    )


def _check_fits(variant: Variant, base_dir: Path) -> None:
    raw = read_json(base_dir / "config.json")
    expected = base_variant(raw)
    if expected != variant:
        raise CheckpointError(
            f"the LAVIS checkpoint is a {variant} model but the base {base_dir} is {expected}: "
            "pass a base of the same kind and language model"
        )
