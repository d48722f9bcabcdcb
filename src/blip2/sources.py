"""Finding the image files a user means: folders (recursively), globs, single files and `@list.txt` files of
paths, expanded into a list of image files plus what was skipped and why.

Files are recognised as images by their first bytes (the signatures of the formats `blip2.images` decodes),
not by their extension: `IMG_0001` without an extension is found, `notes.jpg` holding text is not. Hidden
files and folders (a name starting with '.') inside folders are passed over without a word; a hidden file
named explicitly is taken. Symbolic links are followed, each folder and each file is visited once (a link
loop or two links to one folder cannot repeat anything), and nothing is opened that is not a regular file:
FIFOs, devices and sockets are skipped unopened.

Pure: no model, no index; the index, and later the batch jobs, build on it. Nothing imported beyond the
standard library.
"""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

# Magic bytes of the formats the decoder accepts (blip2.images.RASTER_FORMATS + AVIF/HEIF when installed).
# Each entry: (offset, signature).
_SIGNATURES: tuple[tuple[int, bytes], ...] = (
    (0, b"\xff\xd8\xff"),  # JPEG (and MPO)
    (0, b"\x89PNG\r\n\x1a\n"),  # PNG
    (0, b"GIF87a"),
    (0, b"GIF89a"),
    (0, b"BM"),  # BMP
    (0, b"II*\x00"),  # TIFF, little-endian
    (0, b"MM\x00*"),  # TIFF, big-endian
)
# ISO base media files (AVIF, HEIF): 'ftyp' at offset 4, then the major brand.
_FTYP_BRANDS = (b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
_HEAD_BYTES = 16
# A line of a @list file longer than this is not a path (PATH_MAX is 4096 on Linux).
MAX_LIST_LINE = 8192


@dataclass(frozen=True)
class Skipped:
    """An input, or a file found under one, that is not taken, and why (one short phrase)."""

    path: str
    reason: str


@dataclass
class Found:
    """The image files found, in a stable order (inputs in the order given, folders walked in sorted name
    order), each once; and what was skipped."""

    files: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def image_signature(head: bytes) -> bool:
    """Whether `head`, the first bytes of a file (16 suffice), starts like an image the decoder reads."""
    if any(head[offset:].startswith(sig) for offset, sig in _SIGNATURES):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return head[4:8] == b"ftyp" and head[8:12] in _FTYP_BRANDS


def find_images(inputs: Iterable[str | bytes | os.PathLike]) -> Found:
    """Expand `inputs` into image files.

    Each input is a folder (walked recursively), a file, a glob pattern (`*`, `?`, `[...]`, `**` for any
    depth) when no file has that very name, or `@FILE`: a text file of such inputs, one per line (blank
    lines ignored; relative paths are relative to the current folder). An input that names nothing, a file
    that is not an image, an unreadable one or a link loop is in `skipped` with its reason.
    """
    walk = _Walk()
    for item in inputs:
        walk.input(os.fsdecode(item))
    return walk.found


class _Walk:
    """One expansion: the result so far and the (device, inode) pairs already taken."""

    def __init__(self) -> None:
        self.found = Found()
        self._seen_files: set[tuple[int, int]] = set()
        self._seen_dirs: set[tuple[int, int]] = set()
        self._lists: set[tuple[int, int]] = set()

    def input(self, item: str) -> None:
        if item.startswith("@") and not os.path.lexists(item):
            self._list(item[1:])
        elif os.path.lexists(item):
            self._path(item, explicit=True)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                self._skip(item, "no file matches this pattern")
            for match in matches:
                self._path(match, explicit=True)
        else:
            self._skip(item, "no such file or folder")

    def _list(self, name: str) -> None:
        """The inputs listed in the text file `name`, one per line."""
        try:
            info = os.stat(name)
            if not stat.S_ISREG(info.st_mode):
                self._skip("@" + name, "the list is not a regular file")
                return
            if (info.st_dev, info.st_ino) in self._lists:
                self._skip("@" + name, "this list was already read (a list that includes itself?)")
                return
            self._lists.add((info.st_dev, info.st_ino))
            for number, line in enumerate(_lines(name), 1):
                if line is None:
                    self._skip(f"@{name}:{number}", f"line longer than {MAX_LIST_LINE} characters")
                elif line.strip():
                    self.input(line.rstrip("\r\n"))
        except OSError as e:
            self._skip("@" + name, f"cannot read the list: {e.strerror or e}")
        except UnicodeDecodeError:
            self._skip("@" + name, "the list is not UTF-8 text")

    def _path(self, path: str, explicit: bool) -> None:
        try:
            info = os.stat(path)  # follows links
        except OSError as e:
            reason = "broken symbolic link" if os.path.islink(path) else (e.strerror or str(e))
            self._skip(path, reason)
            return
        if stat.S_ISDIR(info.st_mode):
            self._folder(path, info)
        elif not stat.S_ISREG(info.st_mode):
            self._skip(path, "not a regular file (a FIFO, device or socket)")
        else:
            self._file(path, info, explicit)

    def _folder(self, path: str, info: os.stat_result) -> None:
        # Iterative: a deep tree cannot exhaust the stack.
        stack: list[tuple[str, os.stat_result]] = [(path, info)]
        while stack:
            folder, folder_info = stack.pop()
            key = (folder_info.st_dev, folder_info.st_ino)
            if key in self._seen_dirs:
                continue  # a link back up (a loop) or a second way into the same folder
            self._seen_dirs.add(key)
            subfolders = []
            for entry_path in self._entries(folder):
                try:
                    entry_info = os.stat(entry_path)
                except OSError as e:
                    reason = "broken symbolic link" if os.path.islink(entry_path) else (e.strerror or str(e))
                    self._skip(entry_path, reason)
                    continue
                if stat.S_ISDIR(entry_info.st_mode):
                    subfolders.append((entry_path, entry_info))
                elif stat.S_ISREG(entry_info.st_mode):
                    self._file(entry_path, entry_info, explicit=False)
                else:
                    self._skip(entry_path, "not a regular file (a FIFO, device or socket)")
            stack.extend(reversed(subfolders))  # walked in name order, depth first

    def _entries(self, folder: str) -> list[str]:
        """The visible entries of `folder`, sorted by name."""
        try:
            with os.scandir(folder) as entries:
                names = sorted(entry.name for entry in entries if not entry.name.startswith("."))
        except OSError as e:
            self._skip(folder, f"cannot list the folder: {e.strerror or e}")
            return []
        return [os.path.join(folder, name) for name in names]

    def _file(self, path: str, info: os.stat_result, explicit: bool) -> None:
        key = (info.st_dev, info.st_ino)
        if key in self._seen_files:
            return  # the same file again (through a link, or named twice)
        try:
            head = _head(path)
        except OSError as e:
            self._skip(path, f"cannot read: {e.strerror or e}")
            return
        if not image_signature(head):
            self._skip(path, "empty file" if not head else "not an image (unknown content)")
            return
        self._seen_files.add(key)
        self.found.files.append(path)

    def _skip(self, path: str, reason: str) -> None:
        self.found.skipped.append(Skipped(path, reason))


def _head(path: str) -> bytes:
    # O_NONBLOCK: a FIFO swapped in after the stat must not block the open.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        return os.read(fd, _HEAD_BYTES)
    finally:
        os.close(fd)


def _lines(name: str) -> Iterator[str | None]:
    """The lines of a text file, each at most MAX_LIST_LINE characters (None for a longer one, whose rest is
    passed over): a list file without line breaks cannot fill the memory."""
    with open(name, encoding="utf-8", newline="") as f:
        while True:
            line = f.readline(MAX_LIST_LINE + 1)
            if not line:
                return
            if len(line) > MAX_LIST_LINE and not line.endswith("\n"):
                while (rest := f.readline(MAX_LIST_LINE)) and not rest.endswith("\n"):
                    pass
                yield None
                continue
            yield line
