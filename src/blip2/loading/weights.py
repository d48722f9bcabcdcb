"""Read a checkpoint's tensors and assign them to a model built on the meta device.

No random initialisation of billions of parameters and no second copy in memory: the model is built on the
meta device, each tensor is read from safetensors straight to its device and dtype, and assigned. The key
check is strict and names what is missing and what is unexpected.

Every checkpoint file is treated as hostile. Names taken from a checkpoint (shard names in an index) must
stay inside its directory; index files and safetensors headers are size-capped and validated before use;
pickled weights (.bin) are only read with torch's weights-only loader; the config is checked against the
tensor shapes in the headers before the model is built, so a config that asks for a million layers fails
at once instead of building them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from operator import attrgetter
from pathlib import Path, PureWindowsPath

import torch
from torch import Tensor, nn

from ..config import Blip2Config
from ..errors import CheckpointError
from ..files import os_error, read_json
from ..models.registry import T5_EMBED, Anchor, family

# Refused before parsing: no real index comes near (OPT-6.7b's is ~100 KB); safetensors itself caps at 100 MB.
MAX_INDEX_BYTES = 16 * 2**20
MAX_HEADER_BYTES = 100 * 2**20

# The weight layouts, in order of preference: (single file, index of shards). safetensors is what the Hub
# holds today (transformers 4.47 rewrote the Salesforce repos in Nov 2024); the 2023 copies in caches and
# mirrors are pickled .bin shards.
WEIGHT_LAYOUTS = [
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
]

# Checkpoint key -> our key, as data: (regex, replacement); a replacement of None drops the key.
# The Hugging Face layout is our native one, so these only drop what we do not keep and move InstructBLIP's.
HF_KEY_RULES: list[tuple[str, str | None]] = [
    (r"\.position_ids$", None),  # buffers some exporters save
    # transformers <= 4.31 saved LLaMA's rotary frequencies; we compute them from the config.
    (r"\.rotary_emb\.inv_freq$", None),
    # InstructBLIP keeps the instruction's embeddings and the Q-Former's input LayerNorm in one module.
    (r"^qformer\.embeddings\.layernorm\.", "qformer.layernorm."),
    (r"^qformer\.embeddings\.(word_embeddings|position_embeddings)\.", r"embeddings.\1."),
    # Older T5 exports carry a cross-attention position bias that T5 never uses (the reference ignores it too).
    (r"EncDecAttention\.relative_attention_bias\.weight$", None),
]

# Names (our layout) under which checkpoints store one and the same tensor, beyond the model's own ties
# (`tied_weights`, when its config ties them). The Hub's conversion bot keeps whichever name sorts first, so
# any one may be the only one present: it fills the others that the model has.
ALIAS_GROUPS: list[tuple[str, ...]] = [T5_EMBED]


def rename(key: str, rules: list[tuple[str, str | None]]) -> str | None:
    """Apply the first matching rule to `key`; None means the key is dropped."""
    for pattern, replacement in rules:
        if re.search(pattern, key):
            return None if replacement is None else re.sub(pattern, replacement, key)
    return key


# -- files ----------------------------------------------------------------------------------------------------
def checkpoint_file(directory: Path, name: object, named_by: str | os.PathLike = "") -> Path:
    """`directory / name` for a file name taken from a checkpoint, refused unless it stays inside `directory`.

    The check is lexical and comes before any filesystem access, so a hostile name can neither load a
    foreign file nor reveal whether a path exists: no absolute paths, drive letters, backslashes, NUL, empty
    names or `.` / `..` components. Symlinks the directory holds are followed as usual (the Hugging Face
    cache stores snapshot files as links into its blobs folder). `named_by` (the index file) is named in the
    error.
    """
    problem = _unsafe_name(name)
    if problem:
        source = f"{named_by}: " if named_by else ""
        raise CheckpointError(f"{source}refused file name {name!r} ({problem})")
    return directory / str(name)


def _unsafe_name(name: object) -> str | None:
    """Why `name` may not name a file inside a checkpoint directory, or None when it may."""
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    if "\0" in name:
        return "contains NUL"
    if "\\" in name or PureWindowsPath(name).drive:
        return "backslashes and drive letters are not allowed"
    if name.startswith("/"):
        return "absolute paths are not allowed"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "empty, '.' and '..' path components are not allowed"
    return None


def checkpoint_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory: one safetensors file, sharded ones (through their index),
    or the same two layouts as pickled .bin files (read weights-only). Nothing else is picked up."""
    for single, index in WEIGHT_LAYOUTS:
        if _present(directory / single):
            return [_require_file(directory / single)]
        if _present(directory / index):
            return index_shards(directory / index, Path(single).suffix)
    raise CheckpointError(
        f"{directory} has no weights: expected model.safetensors, or model.safetensors.index.json with its "
        "shards (or their pytorch_model.bin equivalents)"
    )


def index_shards(index: Path, suffix: str) -> list[Path]:
    """The shard files an index names, confined to its directory and of its kind (`suffix`), each checked to
    hold the keys the index assigns to it (from the headers only for safetensors)."""
    weight_map = read_index(index)
    directory = index.parent
    names = sorted(set(weight_map.values()))
    shards = {name: checkpoint_file(directory, name, index) for name in names}
    foreign = [name for name in names if not name.endswith(suffix)]
    if foreign:
        raise CheckpointError(f"{index}: names shards that are not {suffix} files: {_some(foreign)}")
    missing = [name for name, path in shards.items() if not _present(path)]
    if missing:
        raise CheckpointError(f"{directory}: shards listed in {index.name} are missing: {', '.join(missing)}")
    for name, path in shards.items():
        held = tensor_shapes(_require_file(path))
        absent = [key for key, shard in weight_map.items() if shard == name and key not in held]
        if absent:
            raise CheckpointError(
                f"{index}: lists keys that {name} does not hold ({len(absent)}): {_some(absent)}"
            )
    return list(shards.values())


def read_index(index: Path) -> dict[str, str]:
    """An index file's weight_map ({tensor key: shard file name}), validated and size-capped."""
    weight_map = read_json(index, MAX_INDEX_BYTES).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: has no weight_map object")
    bad = [k for k, v in weight_map.items() if not isinstance(v, str)]
    if bad:
        raise CheckpointError(
            f"{index}: weight_map values must be file names (strings); not for {_some(bad)}"
        )
    return weight_map


def _present(path: Path) -> bool:
    # A dangling symlink (an interrupted Hub download) counts as present, so that it is reported, not skipped.
    try:
        return path.is_symlink() or path.exists()
    except OSError as e:  # e.g. a folder on the way that may not be searched
        raise os_error(path, e) from None


def _require_file(path: Path) -> Path:
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a weights file")
    if not path.exists():
        raise CheckpointError(f"{path}: not found (a dangling link?)")
    return path


# -- tensors --------------------------------------------------------------------------------------------------
def tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's key and shape in one weights file, without reading the data: the validated safetensors
    header, or a pickle's state dict memory-mapped through the weights-only loader."""
    if file.suffix == ".safetensors":
        return safetensors_header(file)
    return {key: tuple(tensor.shape) for key, tensor in _load_pickle(file, torch.device("cpu")).items()}


def safetensors_header(file: Path) -> dict[str, tuple[int, ...]]:
    """Parse and check a safetensors header (size-capped, offsets within the file): key -> shape.

    Layout: an 8-byte little-endian header length N, N bytes of JSON {key: {dtype, shape, data_offsets}},
    then the data. A truncated or garbage file fails here, with the file's name, rather than in Rust.
    """
    try:
        with file.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if n < 0:
                raise _corrupt(file, f"{size} bytes, too short for a safetensors header")
            if n > MAX_HEADER_BYTES:
                raise _corrupt(file, f"header of {n} bytes, more than the {MAX_HEADER_BYTES} allowed")
            if 8 + n > size:
                raise _corrupt(file, f"header of {n} bytes in a file of {size} (truncated?)")
            raw = f.read(n)
    except OSError as e:
        raise os_error(file, e) from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise _corrupt(file, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(file, "its header is not a JSON object")
    data_size = size - 8 - n
    header.pop("__metadata__", None)
    shapes = {}
    for key, entry in header.items():
        problem = _bad_entry(entry, data_size)
        if problem:
            raise _corrupt(file, f"tensor {key!r}: {problem}")
        shapes[key] = tuple(entry["shape"])
    return shapes


# Bytes per element of the safetensors dtypes torch can load.
SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


def _bad_entry(entry: object, data_size: int) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(entry, dict):
        return "not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        return f"unknown dtype {str(dtype)[:40]!r}"
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return f"bad shape {shape!r}"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        return f"bad data_offsets {offsets!r}"
    if not 0 <= offsets[0] <= offsets[1] <= data_size:
        return f"data_offsets {offsets} outside the {data_size} bytes of data (truncated?)"
    if offsets[1] - offsets[0] != math.prod(shape) * SAFETENSORS_DTYPES[dtype]:
        return f"data_offsets {offsets} do not hold a {dtype} tensor of shape {tuple(shape)}"
    return None


def _corrupt(file: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{file}: not a valid safetensors file: {reason}")


def _load_pickle(file: Path, device: torch.device) -> dict[str, Tensor]:
    """A pickled state dict through torch's weights-only loader (no code runs), memory-mapped."""
    try:
        state = torch.load(file, map_location=device, weights_only=True, mmap=True)
    except OSError as e:
        raise os_error(file, e) from None
    except Exception as e:  # the loader's refusals (UnpicklingError, RuntimeError, ...): a boundary
        raise CheckpointError(
            f"{file}: cannot be read with torch's weights-only loader ({_first_line(e)})"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{file}: not a state dict (a mapping of names to tensors)")
    return state


def read_tensors(files: list[Path], device: torch.device) -> Iterator[tuple[str, Tensor]]:
    """Yield (key, tensor) one at a time, so that at most one extra tensor is in memory."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        if file.suffix != ".safetensors":
            yield from _load_pickle(file, device).items()
            continue
        safetensors_header(file)  # a clear error for a corrupt file, before the library's own
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except OSError as e:
            raise os_error(file, e) from None
        except SafetensorError as e:
            raise _corrupt(file, _first_line(e)) from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- the config against the files ----------------------------------------------------------------------------
PATCH = ("vision_model.embeddings.patch_embedding.weight",)  # (C, 3, P, P)
QUERIES = ("query_tokens",)  # (1, Q, 768)

# Layer counts: config field -> the key pattern whose distinct indices are that tower's layers. The language
# model's are in its registry entry (models/registry.py), with its anchors.
LAYERS = [
    ("vision.num_hidden_layers", r"^vision_model\.encoder\.layers\.(\d+)\."),
    ("qformer.num_hidden_layers", r"^qformer\.encoder\.layer\.(\d+)\."),
]

ANCHORS = [
    Anchor("vision.hidden_size", PATCH, 0),
    Anchor("vision.patch_size", PATCH, 2),
    Anchor("num_query_tokens", QUERIES, 1),
    Anchor("qformer.hidden_size", QUERIES, 2),
    Anchor("qformer.vocab_size", ("embeddings.word_embeddings.weight",), 0),
    Anchor("qformer.max_position_embeddings", ("embeddings.position_embeddings.weight",), 0),
]


def check_config_against_checkpoint(config: Blip2Config, files: list[Path]) -> None:
    """Check the config's layer counts and sizes against the tensor shapes in the weight files' headers,
    before anything is built: an untrusted config.json could otherwise ask for a million layers, which take
    minutes to build even on the meta device. A mismatch names the config field, its value and the tensors.
    """
    shapes = checkpoint_shapes(files)
    layers, anchors = LAYERS, ANCHORS
    if config.text is not None:
        lm = family(config.text)
        layers, anchors = layers + list(lm.layer_keys), anchors + list(lm.anchors)
    for field, pattern in layers:
        _check_layers(config, field, pattern, shapes)
    for anchor in anchors:
        _check_anchor(config, anchor, shapes)


def checkpoint_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in our layout (keys renamed by HF_KEY_RULES), from the headers only."""
    shapes = {}
    for file in files:
        for key, shape in tensor_shapes(file).items():
            ours = rename(key, HF_KEY_RULES)
            if ours is not None:
                shapes[ours] = shape
    return shapes


def _check_layers(config: Blip2Config, field: str, pattern: str, shapes: dict) -> None:
    value = attrgetter(field)(config)
    found = {m.group(1) for key in shapes if (m := re.match(pattern, key))}
    if value != len(found):
        raise CheckpointError(
            f"config.json says {field} = {value!r}, but the weights hold {len(found)} such layers"
        )


def _check_anchor(config: Blip2Config, anchor: Anchor, shapes: dict) -> None:
    key = next((k for k in anchor.keys if k in shapes), None)
    if key is None:
        return  # absent: the strict key check names it
    value, shape = attrgetter(anchor.field)(config), shapes[key]
    if len(shape) <= anchor.axis or value != shape[anchor.axis] - anchor.offset:
        raise CheckpointError(
            f"config.json says {anchor.field} = {value!r}, which does not fit {key} of shape {list(shape)}"
        )


# -- assigning ------------------------------------------------------------------------------------------------
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
    """The language model's dtype when `dtype` is asked for: its family's policy (Flan-T5: see above)."""
    return dtype if config.text is None else family(config.text).weights_dtype(dtype)


def assign_weights(
    model: nn.Module,
    tensors: Iterator[tuple[str, Tensor]],
    plan: Callable[[str], torch.dtype],
    rules: list[tuple[str, str | None]] = HF_KEY_RULES,
) -> None:
    """Assign checkpoint tensors to `model` (built on the meta device), strictly.

    A tensor stored under any one of its names (ALIAS_GROUPS, and the model's `tied_weights` when its config
    ties them) fills the others. A tied key (an OPT lm_head tied to the embeddings) that is absent, or that
    filled its source, is tied after loading; present beside its source, it is loaded as its own tensor, as
    the reference does.
    """
    expected = dict(model.state_dict(keep_vars=True))
    tied = _tied_keys(model)
    groups = alias_groups(expected, tied)
    group_of = {key: group for group in groups for key in group}
    state: dict[str, Tensor] = {}
    spare: dict[str, Tensor] = {}  # a tensor found under a name the model lacks; one per group is enough
    unexpected, mismatched = [], []
    for key, tensor in tensors:
        ours = rename(key, rules)
        if ours is None:
            continue
        target = ours if ours in expected else _member(group_of.get(ours, ()), expected)
        if target is None:
            unexpected.append(key)
        elif tuple(tensor.shape) != tuple(expected[target].shape):
            mismatched.append(
                f"{key}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[target].shape)}"
            )
        elif target == ours:
            state[ours] = tensor.to(plan(ours))
            if ours not in tied:  # the group's own tensor: a spare would only take memory
                for k in group_of.get(ours, ()):
                    spare.pop(k, None)
        elif not any(k in spare or (k in state and k not in tied) for k in group_of[ours]):
            spare[ours] = tensor.to(plan(target))
    _fill_aliases(state, spare, groups, expected)
    ties = {k: s for k, s in tied.items() if s in state and (k not in state or state[k] is state[s])}
    for key in ties:
        state.pop(key, None)
    _check_fit([k for k in expected if k not in state and k not in ties], unexpected, mismatched)
    model.load_state_dict(state, strict=False, assign=True)
    _tie(model, ties)


def _check_fit(missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
    """Raise one error that names every missing, unexpected and mismatched key (the first few of each)."""
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


def alias_groups(model_keys: dict | set, tied: dict[str, str]) -> list[tuple[str, ...]]:
    """The groups of names of one tensor for this model: the ALIAS_GROUPS it has a member of, and its ties
    ({key: source}); groups that share a name are merged (tied T5: shared, lm_head and both embed_tokens).

    A tied head comes last in its group, so that it fills the embeddings only when no other name of them is
    there: a head stored beside them may be a tensor of its own (the reference then loads it as such).
    """
    merged: list[set[str]] = []
    candidates = [set(g) for g in ALIAS_GROUPS if any(k in model_keys for k in g)]
    for group in candidates + [{key, source} for key, source in tied.items()]:
        for other in [m for m in merged if m & group]:
            group |= other
            merged.remove(other)
        merged.append(group)
    return [tuple(sorted(g, key=lambda k: (k in tied, k))) for g in merged]


def _member(group: tuple[str, ...], model_keys: dict) -> str | None:
    """The first name in `group` that the model has (the one a spare tensor is checked against)."""
    return next((k for k in group if k in model_keys), None)


def _fill_aliases(state: dict, spare: dict, groups: list[tuple[str, ...]], expected: dict) -> None:
    """Fill each group's names that the model has from whichever one the checkpoint holds. Members of a group
    share a dtype (all in the language model), so the tensor is used as it is."""
    for group in groups:
        held = [k for k in group if k in state or k in spare]
        if not held:
            continue  # none of its names: the missing keys say so
        source = state[held[0]] if held[0] in state else spare[held[0]]
        for key in group:
            if key in expected and key not in state:
                state[key] = source


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
