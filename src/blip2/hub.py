"""Resolve a model name to a local directory in the Hugging Face layout.

A local directory is used as it is. A repo id ("Salesforce/blip2-opt-2.7b") is looked up in the local
Hugging Face cache first, then downloaded through huggingface_hub. Offline, or with nothing on disk, the
error says what is missing and how to get it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError

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

# Only what loading needs: no pickles, no other frameworks' weights.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]


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
    if not _looks_like_repo_id(name):
        raise CheckpointError(f"no such directory: {name}")
    return _download(name)


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
    except Exception:
        pass  # not (completely) in the local cache: try the network
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS))
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


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no details"
