"""Keeping an index's vectors in memory: map every page of the vector file into the process, in the background.

The exact stage reads each candidate image's 16 KB of vectors from a memory-mapped file. A page that is in the
page cache but not yet mapped into this process costs a minor fault on first touch; one that the kernel has
dropped from the cache costs a disk read. A long-lived searcher (the HTTP service) reads a few thousand random
images per query, so at a million images most of its first queries touch pages it has never mapped, and a
kernel or hypervisor that reclaims idle unmapped page cache (this project's VMs run DAMON with a `pageout`
scheme for unmapped file pages idle for 60 s) keeps dropping the rest: candidate gathering then dominates a
query (benchmarks/RESULTS.md, "resident vectors").

`populate` asks the kernel to read the file and map all of it (`madvise(MADV_POPULATE_READ)`, Linux 5.14+), a
chunk at a time from a daemon thread through ctypes, which releases the GIL, so a server starts answering at
once and gets faster as the pages arrive. The pages stay clean file pages: under memory pressure the kernel can
still reclaim them, so this costs page cache, never an out-of-memory kill. Where MADV_POPULATE_READ is missing,
MADV_WILLNEED (read-ahead only) is used; where madvise is missing altogether, nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import threading
from collections.abc import Callable, Iterator

import numpy as np

MADV_WILLNEED = 3
MADV_POPULATE_READ = 22  # Linux 5.14+: fault every page in (read), without writing to it
CHUNK_BYTES = 256 << 20  # per madvise call: a stop request is seen between chunks

Advise = Callable[[int, int, int], int]  # (address, length, advice) -> 0, or an errno


def chunks(
    address: int, length: int, chunk: int = CHUNK_BYTES, page: int = mmap.PAGESIZE
) -> Iterator[tuple[int, int]]:
    """(address, length) pieces covering [address, address + length) rounded out to whole pages, each at
    most `chunk` bytes (a multiple of `page`) and starting on a page boundary."""
    start = address - address % page
    end = address + length
    step = max(page, chunk - chunk % page)
    for at in range(start, end, step):
        yield at, min(step, end - at)


def populate(array: np.ndarray, advise: Advise | None = None, stop: threading.Event | None = None) -> int:
    """Fault in every page under `array` (a mapped file's array), a chunk at a time; returns the advice that
    worked (MADV_POPULATE_READ, MADV_WILLNEED) or 0 when neither did (or madvise is unavailable)."""
    advise = advise or _libc_madvise()
    if advise is None or array.nbytes == 0:
        return 0
    used = 0
    for address, length in chunks(array.ctypes.data, array.nbytes):
        if stop is not None and stop.is_set():
            break
        for advice in (MADV_POPULATE_READ, MADV_WILLNEED) if used == 0 else (used,):
            if advise(address, length, advice) == 0:
                used = advice
                break
        else:
            return 0  # neither advice is supported here: nothing more to try
    return used


def populate_in_background(array: np.ndarray) -> tuple[threading.Thread, threading.Event]:
    """`populate(array)` on a daemon thread (it keeps `array`, so the mapping, alive until done); set the
    returned event to stop it after the current chunk."""
    stop = threading.Event()
    thread = threading.Thread(
        target=populate, args=(array, None, stop), name="blip2-index-resident", daemon=True
    )
    thread.start()
    return thread, stop


def _libc_madvise() -> Advise | None:
    """libc's madvise through ctypes (the call releases the GIL), as (address, length, advice) -> 0 or errno;
    None where there is no such function."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int

    def advise(address: int, length: int, advice: int) -> int:
        return 0 if function(address, length, advice) == 0 else ctypes.get_errno() or -1

    return advise
