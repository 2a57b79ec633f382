"""The memory allocator a training process runs with.

A fast allocator (jemalloc, tcmalloc) must be preloaded when the process starts, so nlpwf
detects one rather than sets it, and says when one is installed but not in use. Without one,
glibc malloc is told to keep freed memory for reuse (`keep_freed_memory`).
"""
from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

ALLOCATORS = {"jemalloc": "libjemalloc.so*", "tcmalloc": "libtcmalloc*.so*"}
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def loaded_allocator() -> str:
    """jemalloc or tcmalloc when one is mapped into this process (LD_PRELOAD), else the system malloc."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name in ALLOCATORS:
        if f"lib{name}" in maps:
            return name
    return "system"


def find_allocator(prefer: tuple[str, ...] = ("jemalloc", "tcmalloc")) -> str | None:
    """Path of an installed fast allocator to preload, or None. Searches the environment's
    own lib dir first (conda installs jemalloc there), then the system's."""
    dirs = (os.path.join(sys.prefix, "lib"),) + LIBRARY_DIRS
    for name in prefer:
        for d in dirs:
            hits = sorted(p for p in glob.glob(os.path.join(d, ALLOCATORS[name])) if "debug" not in p)
            if hits:
                return hits[0]
    return None


def preload_env() -> dict[str, str]:
    """Environment that makes a new process use the fast allocator (empty when none is installed)."""
    path = find_allocator()
    if path is None:
        return {}
    current = os.environ.get("LD_PRELOAD", "")
    return {"LD_PRELOAD": f"{path}:{current}" if current else path}


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def glibc() -> bool:
    """Whether this process runs on glibc (not musl or macOS: other mallocs, other parameters)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory in the heap for reuse, instead of handing it back to
    the kernel. glibc serves each allocation above its mmap threshold (32 MB at most) with a
    fresh mapping and unmaps it on free, and frees the top of its heap beyond 128 kB. A training
    step allocates and frees the same large tensors every step (MiniLM's word-embedding gradient
    alone is 47 MB), so every step page-faults and the kernel zero-fills those pages again:
    12-18 thousand faults per MiniLM step on MRPC, about 1,000 with this (benchmarks/README.md).
    Peak memory stays the same, as the tensors of one step are reused by the next. Returns
    whether it took effect (not glibc: False). jemalloc and tcmalloc keep memory on their own."""
    if not glibc():
        return False
    try:
        libc = ctypes.CDLL(None)
        # mallopt returns 1 on success; with mmap off, large blocks come from the heap too
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def prepare(keep_freed: bool = True, announce: bool = True) -> str:
    """The allocator this process runs with, as metrics.json records it; glibc malloc is told to
    keep freed memory when `keep_freed`. `announce`: log it, and the fast allocator that could be
    preloaded (one process per node does)."""
    allocator = loaded_allocator()
    if allocator != "system":
        return allocator
    if keep_freed and keep_freed_memory():
        allocator = "system, freed memory kept"
    if announce:
        hint = find_allocator()
        log.info("allocator: %s%s", allocator.replace("system", "system malloc"),
                 f" ({hint} is installed: see docs/performance.md to preload it)" if hint else "")
    return allocator
