"""Read a checkpoint's tensors and assign them to a model built on the meta device.

No random initialisation of billions of parameters and no second copy in memory: the model is built on the
meta device, each tensor is read from safetensors straight to its device and dtype, and assigned. The key
check is strict and names what is missing and what is unexpected. Pickled weights (.bin/.pth) are only
read with torch's weights-only loader.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import Blip2Config, T5Config
from .errors import CheckpointError

# Checkpoint key -> our key, as data: (regex, replacement); a replacement of None drops the key.
# The Hugging Face layout is our native one, so these only drop aliases of tensors we keep once.
HF_KEY_RULES: list[tuple[str, str | None]] = [
    (r"^language_model\.(encoder|decoder)\.embed_tokens\.weight$", None),  # T5: the same tensor as `shared`
    (r"\.position_ids$", None),  # buffers some exporters save
    # InstructBLIP keeps the instruction's embeddings and the Q-Former's input LayerNorm in one module.
    (r"^qformer\.embeddings\.layernorm\.", "qformer.layernorm."),
    (r"^qformer\.embeddings\.(word_embeddings|position_embeddings)\.", r"embeddings.\1."),
    # Older T5 exports carry a cross-attention position bias that T5 never uses (the reference ignores it too).
    (r"EncDecAttention\.relative_attention_bias\.weight$", None),
]


def rename(key: str, rules: list[tuple[str, str | None]]) -> str | None:
    """Apply the first matching rule to `key`; None means the key is dropped."""
    for pattern, replacement in rules:
        if re.search(pattern, key):
            return None if replacement is None else re.sub(pattern, replacement, key)
    return key


def checkpoint_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory: one safetensors file, sharded ones, or (weights-only) .bin."""
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{directory}: shards listed in {index.name} are missing: {', '.join(missing)}"
            )
        return [directory / s for s in shards]
    pickles = sorted(directory.glob("pytorch_model*.bin")) + sorted(directory.glob("*.pth"))
    if pickles:
        return pickles
    raise CheckpointError(
        f"{directory} has no weights: expected model.safetensors, or model.safetensors.index.json with its shards"
    )


def read_tensors(files: list[Path], device: torch.device) -> Iterator[tuple[str, Tensor]]:
    """Yield (key, tensor) one at a time, so that at most one extra tensor is in memory."""
    from safetensors import safe_open

    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            try:
                state = torch.load(file, map_location=device, weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(
                    f"{file}: cannot be read with torch's weights-only loader ({e})"
                ) from None
            yield from state.items()


def dtype_plan(config: Blip2Config, dtype: torch.dtype) -> Callable[[str], torch.dtype]:
    """The dtype of each parameter, as the reference does it: Q-Former and query tokens in float32, the
    vision tower, projection and language model in `dtype` (InstructBLIP keeps only the query tokens in
    float32, as its reference does). Flan-T5 overflows in float16 (its authors use
    bfloat16), so its language model is kept in bfloat16 when float16 is asked for (see `lm_dtype`)."""
    lm = lm_dtype(config, dtype)

    float32_prefixes = (
        ("query_tokens",) if config.model_type == "instructblip" else ("qformer.", "query_tokens")
    )

    def plan(key: str) -> torch.dtype:
        if key.startswith(float32_prefixes):
            return torch.float32
        if key.startswith("language_model."):
            return lm
        return dtype

    return plan


def lm_dtype(config: Blip2Config, dtype: torch.dtype) -> torch.dtype:
    if isinstance(config.text, T5Config) and dtype == torch.float16:
        return torch.bfloat16
    return dtype


def assign_weights(
    model: nn.Module,
    tensors: Iterator[tuple[str, Tensor]],
    plan: Callable[[str], torch.dtype],
    rules: list[tuple[str, str | None]] = HF_KEY_RULES,
) -> None:
    """Assign checkpoint tensors to `model` (built on the meta device), strictly.

    Keys named in the model's `tied_weights` (e.g. an OPT lm_head tied to the embeddings) may be absent: they
    are tied after loading. Present, they are loaded as their own tensor, as the reference does.
    """
    expected = dict(model.state_dict(keep_vars=True))
    tied = _tied_keys(model)
    state: dict[str, Tensor] = {}
    unexpected, mismatched = [], []
    for key, tensor in tensors:
        ours = rename(key, rules)
        if ours is None:
            continue
        if ours not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[ours].shape):
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[ours].shape)}")
            continue
        state[ours] = tensor.to(plan(ours))
    missing = [k for k in expected if k not in state and k not in tied]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_some(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_some(mismatched)}")
    if problems:
        raise CheckpointError(
            "the checkpoint does not fit the model built from its config.json: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=False, assign=True)
    _tie(model, {k: v for k, v in tied.items() if k not in state})


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """All `tied_weights` maps of submodules whose config ties them, with full key prefixes."""
    tied = {}
    for prefix, module in model.named_modules():
        if not getattr(getattr(module, "config", None), "tie_word_embeddings", True):
            continue
        for key, source in getattr(module, "tied_weights", {}).items():
            p = f"{prefix}." if prefix else ""
            tied[p + key] = p + source
    return tied


def _tie(model: nn.Module, ties: dict[str, str]) -> None:
    for key, source in ties.items():
        module_name, _, attr = key.rpartition(".")
        setattr(model.get_submodule(module_name), attr, model.get_parameter(source))


def _some(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
