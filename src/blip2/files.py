"""Reading a checkpoint's small files (configs, indexes, tokenizer settings) as hostile input.

One reader for all of them: a regular file only (a FIFO or a device is refused before it is opened, and the
opened descriptor is checked again), never more than a cap of bytes however the file grows, UTF-8, and for
JSON an object. Every failure is a `CheckpointError` whose message starts with the file's path.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import CheckpointError

MAX_JSON_BYTES = 1 << 20  # config.json, generation_config.json, tokenizer settings: a few KiB in practice

# O_NONBLOCK: opening a FIFO swapped in after the check must not wait for a writer.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)


def os_error(file: Path, e: OSError) -> CheckpointError:
    """An OSError as a CheckpointError that says which file and what happened, in words."""
    if isinstance(e, PermissionError):
        return CheckpointError(f"{file}: permission denied")
    if isinstance(e, IsADirectoryError):
        return CheckpointError(f"{file}: is a directory, expected a file")
    if isinstance(e, FileNotFoundError):
        return CheckpointError(f"{file}: not found")
    return CheckpointError(f"{file}: cannot be read ({e.strerror or e})")


def read_bytes(file: Path, limit: int) -> bytes:
    """The bytes of the regular file `file`, refused past `limit` bytes without reading further."""
    try:
        _check(file, os.stat(file), limit)  # before opening: open() blocks on a FIFO
        with open(os.open(file, _OPEN_FLAGS), "rb") as f:
            _check(file, os.fstat(f.fileno()), limit)  # the file actually opened
            data = f.read(limit + 1)  # at most one byte past the limit, however much the file grows
    except OSError as e:
        raise os_error(file, e) from None
    if len(data) > limit:
        raise _too_large(file, limit)
    return data


def read_text(file: Path, limit: int) -> str:
    """The UTF-8 text of `file` (see `read_bytes`)."""
    data = read_bytes(file, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file}: not UTF-8 text (byte {e.start})") from None


def read_json(file: Path, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in `file` (see `read_bytes`); JSON nested too deep to parse is refused too."""
    try:
        data = json.loads(read_text(file, limit))
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{file}: not valid JSON ({str(e)[:120]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: not a JSON object (got {type(data).__name__})")
    return data


def _check(file: Path, info: os.stat_result, limit: int) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"{file}: is a directory, expected a file")
    if not stat.S_ISREG(info.st_mode):
        kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISSOCK: "a socket"}
        kind = next((name for test, name in kinds.items() if test(info.st_mode)), "a special file")
        raise CheckpointError(f"{file}: is {kind}, not a regular file")
    if info.st_size > limit:
        raise _too_large(file, limit)


def _too_large(file: Path, limit: int) -> CheckpointError:
    size = f"{limit >> 20} MiB" if limit % (1 << 20) == 0 else f"{limit} bytes"
    return CheckpointError(f"{file}: larger than {size}, more than a real one needs: refused")
