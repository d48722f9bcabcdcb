"""Resolve a model name to a local directory in the Hugging Face layout.

A local directory is used as it is. "demo" and "demo-itm" name the tiny demo checkpoints shipped inside the
package (blip2/demo/weights/), unless a local directory of that name exists: a path always wins. A repo id ("Salesforce/blip2-opt-2.7b") is looked up in the local
Hugging Face cache first, then downloaded through huggingface_hub. Offline, or with nothing on disk, the
error says what is missing and how to get it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError
from .weights import WEIGHT_LAYOUTS

# The released checkpoints this package is built for (any other in the same layout works too).
KNOWN_CHECKPOINTS = (
    "Salesforce/blip2-opt-2.7b",
    "Salesforce/blip2-opt-6.7b",
    "Salesforce/blip2-opt-2.7b-coco",
    "Salesforce/blip2-opt-6.7b-coco",
    "Salesforce/blip2-flan-t5-xl",
    "Salesforce/blip2-flan-t5-xxl",
    "Salesforce/blip2-flan-t5-xl-coco",
)

# The demo checkpoints shipped in the package (built by `python -m blip2.demo.build`): name -> folder under
# blip2/demo/weights/. The captioning model (stage 2) and the retrieval model (stage 1).
PACKAGED_CHECKPOINTS = {"demo": "demo", "demo-itm": "demo-itm"}

# Only what loading needs: no pickles, no other frameworks' weights ...
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]
# ... unless a repo has no safetensors weights (older copies and mirrors): then its .bin shards, which are
# read with torch's weights-only loader.
PICKLE_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Return the local directory holding checkpoint `name_or_path`, downloading it if needed and possible."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path} has no config.json: not a checkpoint directory in the Hugging Face layout"
            )
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint's directory (with config.json in it)")
    name = str(name_or_path)
    if name in PACKAGED_CHECKPOINTS:
        return packaged(name)
    if not is_repo_id(name):
        raise CheckpointError(
            f"no such directory: {name!r} (and not a valid Hub repo id either: owner/name, with letters, "
            "digits, '-', '_' and '.')"
        )
    return _download(name)


def packaged(name: str) -> Path:
    """The folder of the packaged demo checkpoint `name` (a key of PACKAGED_CHECKPOINTS)."""
    from importlib.resources import files

    path = Path(str(files("blip2.demo") / "weights" / PACKAGED_CHECKPOINTS[name]))
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"the demo checkpoint {name!r} is not in this installation ({path} has no config.json); "
            "rebuild it with `python -m blip2.demo.build OUT` (see blip2/demo/build.py)"
        )
    return path


def is_repo_id(name: str) -> bool:
    """Whether `name` is an "owner/name" repo id by huggingface_hub's rules; nothing else is sent to the Hub
    (a mistyped path with a space in it would otherwise become a request)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1


def _download(repo_id: str) -> Path:
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        local = _snapshot(repo_id, local_files_only=True)
        if _has_weights(local):
            return local
    except Exception:
        pass  # not (completely) in the local cache: try the network
    try:
        return _snapshot(repo_id)
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id} was not found on the Hugging Face Hub (known BLIP-2 checkpoints: "
            f"{', '.join(KNOWN_CHECKPOINTS)})"
        ) from None
    except Exception as e:  # connection errors, offline mode, gated repos, disk full ...
        raise CheckpointError(
            f"cannot download {repo_id} ({type(e).__name__}: {_first_line(e)}). It is not in the local "
            f"Hugging Face cache either. On a machine with internet access run "
            f"`hf download {repo_id} --local-dir DIR`, copy DIR here and pass its path instead "
            f"of the name (or set HF_HOME to a cache that holds it)."
        ) from None


def _snapshot(repo_id: str, **options) -> Path:
    """The repo's safetensors and small files; its .bin shards only when it has no safetensors weights."""
    from huggingface_hub import snapshot_download

    path = Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, **options))
    if not _has_weights(path, pickles=False):
        path = Path(snapshot_download(repo_id, allow_patterns=PICKLE_PATTERNS, **options))
    return path


def _has_weights(path: Path, pickles: bool = True) -> bool:
    layouts = WEIGHT_LAYOUTS if pickles else WEIGHT_LAYOUTS[:1]
    return any((path / name).is_file() for layout in layouts for name in layout)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no details"
