"""Page-cache control and plain file reads for benchmarks: how fast can this machine merely read a set of files?

``evict`` empties the page cache (``/proc/sys/vm/drop_caches`` as root, else ``posix_fadvise(DONTNEED)`` on each
file), ``resident`` says how much of the files is cached (``mincore``), and ``read_sequential`` / ``read_parallel``
read every byte once into reused buffers, the fastest a loader could possibly be without skipping data.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MiB = 1 << 20


def evict(files: list[Path]) -> str:
    """Drop the files from the page cache; returns how, for the notes: "drop_caches" (every cached page of the
    machine, libraries included) or "fadvise DONTNEED" (these files only; clean pages only, hence the sync)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        pass
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise DONTNEED"


def resident(files: list[Path]) -> float:
    """Fraction of the files' pages in the page cache (mincore over a read-only mapping); nan if unavailable."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    cached = total = 0
    for path in files:
        size = path.stat().st_size
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return float("nan")
            pages = (size + page - 1) // page
            vec = ctypes.create_string_buffer(pages)
            ok = libc.mincore(addr, size, vec) == 0
            libc.munmap(addr, size)
            if not ok:
                return float("nan")
            cached += pages - vec.raw.count(0)  # mincore sets bit 0 of a resident page's byte
            total += pages
        finally:
            os.close(fd)
    return cached / total if total else float("nan")


def read_sequential(files: list[Path], block: int = 16 * MiB) -> int:
    """Read the files one after another with ``readinto`` of ``block`` bytes into one buffer; returns bytes read."""
    view = memoryview(bytearray(block))
    total = 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def read_parallel(files: list[Path], threads: int, chunk: int = 64 * MiB) -> int:
    """Read the files as ``chunk``-byte ranges (in file order) spread over ``threads`` threads, each ``os.preadv``
    into its own buffer (the GIL is released while the kernel copies); returns bytes read."""
    fds = {path: os.open(path, os.O_RDONLY) for path in files}
    ranges = [(fds[path], offset) for path in files for offset in range(0, path.stat().st_size, chunk)]
    local = threading.local()

    def read_range(task: tuple[int, int]) -> int:
        if not hasattr(local, "view"):
            local.view = memoryview(bytearray(chunk))
        fd, offset = task
        done = 0
        while done < chunk:
            n = os.preadv(fd, [local.view[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    try:
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(read_range, ranges))
    finally:
        for fd in fds.values():
            os.close(fd)
