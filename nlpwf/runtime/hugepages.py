"""Transparent huge pages for the memory a training process streams through every step.

A training step reads and writes hundreds of MB in long sequential passes: the optimizer over
every parameter, its two moments and its gradient, autocast's weight casts, the word-embedding
gradient, the activations. On 4 kB pages each pass crosses a page boundary every 4 kB, where the
CPU's hardware prefetchers stop and the TLB misses; on 2 MB pages it does so 512 times less
often. A bf16 MiniLM-L6 step on MRPC took about 1/1.06 of its time with glibc's heap on huge
pages, inside the noise of single runs on a shared VM (AMD EPYC Zen 4, 2 threads;
benchmarks/README.md, "Huge pages"). The maths is untouched: the same bytes at the same addresses.

Linux backs anonymous memory with huge pages where a program asks for them (THP `madvise`
mode, a common distribution default) or everywhere (`always`, where a heap that grows a little
at a time may still fault in 4 kB pages). glibc only asks when the process was started with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1, which a running process cannot set for itself. So
`back_heap` does what that tunable would have: it marks glibc's heap MADV_HUGEPAGE and collapses
what is already there into huge pages at once (MADV_COLLAPSE, Linux 6.1 and later). It pays
once the heap holds what every later step reuses: after the first optimizer steps, with
perf.keep_freed_memory keeping freed blocks in the heap (runtime.allocator). Collapsing copies
the heap once (about 2 s for MiniLM-L6's 640 MB on 2 cores); blocks the heap gains later are
collapsed when `back_heap` is called again, and what is already huge is skipped. Given the
time of a step and the steps left, `back_heap` collapses only what those steps pay back
(`pays`): a short run (a test, a smoke run) keeps its 4 kB pages.

jemalloc and tcmalloc keep their memory outside glibc's heap: jemalloc has its own switch
(MALLOC_CONF=thp:always), which a preload sets at process start.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from nlpwf.runtime import allocator

# madvise advice values (linux/mman.h)
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25  # Linux 6.1+: synchronous; older kernels answer EINVAL
KERNEL_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE = 2 << 20


def kernel_mode(setting: Path = KERNEL_SETTING) -> str | None:
    """The kernel's THP mode (`always`, `madvise` or `never`: the bracketed word of the sysfs
    file), or None where there is none (not Linux, THP not built in)."""
    try:
        found = re.search(r"\[(\w+)\]", setting.read_text())
    except OSError:
        return None
    return found.group(1) if found else None


def heap_span(maps: str | None = None) -> tuple[int, int] | None:
    """Start and end address of glibc's main heap (`[heap]` in /proc/self/maps), or None. Once
    part of it is advised, the kernel keeps the part grown after that as another mapping, also
    named [heap]: the span covers them all."""
    if maps is None:
        maps = Path("/proc/self/maps").read_text()
    spans = [tuple(int(a, 16) for a in line.split()[0].split("-")) for line in maps.splitlines() if line.endswith("[heap]")]
    return (min(s for s, _ in spans), max(e for _, e in spans)) if spans else None


def huge_bytes(start: int, end: int, smaps: str | None = None) -> int:
    """Bytes of the mappings within [start, end) that are on transparent huge pages (their
    AnonHugePages in /proc/self/smaps)."""
    if smaps is None:
        smaps = Path("/proc/self/smaps").read_text()
    total, inside = 0, False
    for line in smaps.splitlines():
        head = _MAPPING.match(line)
        if head:
            inside = start <= int(head.group(1), 16) and int(head.group(2), 16) <= end
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return total


_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")


@dataclass
class HeapPages:
    """What `back_heap` found and did, kept across calls (one per process)."""
    status: str = "not reached"  # for metrics.json: what the last call left
    done_up_to: int = 0          # heap addresses below this were collapsed already
    seconds: float = 0.0         # spent collapsing, all calls together


# When collapsing pays: a step ran about 1/1.06 of its time on huge pages, and collapsing took
# about 2.7 ms per MB (MiniLM-L6's 638 MB in 1.7 s, a tiny BERT's 229 MB in 0.6 s), both measured
# on Zen 4 with 2 threads (benchmarks/huge_pages.py). Taken lower than measured, so that a
# collapse happens only where it clearly pays back.
GAIN = 0.04                # of a step's time
COLLAPSE_S_PER_MB = 3e-3


def pays(mb: float, step_s: float, steps_left: int) -> bool:
    """Whether collapsing `mb` of heap pays back within `steps_left` steps of `step_s` seconds."""
    return GAIN * step_s * steps_left > COLLAPSE_S_PER_MB * mb


def back_heap(state: HeapPages, step_s: float | None = None, steps_left: int | None = None) -> HeapPages:
    """Put glibc's heap on transparent huge pages, where this process and kernel allow it: the
    part added since the last call (all of it the first time). With `step_s` and `steps_left`
    (the training steps still to run, each taking about `step_s`), only when that pays back the
    time collapsing takes (`pays`). Updates and returns `state`, whose `status` says what holds
    now, or why nothing was done."""
    if state.status.startswith("off:"):
        return state  # what made it impossible does not change while the process runs
    reason = _unavailable()
    if reason:
        state.status = f"off: {reason}"
        return state
    span = heap_span()
    if span is None:
        state.status = "off: no glibc heap in this process"
        return state
    start, end = span
    begin = max(start, state.done_up_to - state.done_up_to % HUGE)  # whole 2 MB ranges: the last one may have grown
    if end - begin < HUGE:
        return state  # nothing new since the last call: its status holds
    mb = (end - begin) / 2**20
    if step_s is not None and steps_left is not None and not pays(mb, step_s, steps_left):
        if not state.done_up_to:  # nothing collapsed yet: say why
            state.status = (f"skipped: {steps_left} steps of {step_s:.3f} s left would not pay back "
                            f"collapsing {mb:.0f} MB (runtime/hugepages.py, pays)")
        return state
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    t = time.perf_counter()
    if libc.madvise(start, end - start, MADV_HUGEPAGE) != 0:
        state.status = f"off: madvise(MADV_HUGEPAGE) failed: {os.strerror(ctypes.get_errno())}"
        return state
    collapsed = libc.madvise(begin, end - begin, MADV_COLLAPSE) == 0
    error = ctypes.get_errno()
    state.seconds += time.perf_counter() - t
    state.done_up_to = end
    if not collapsed and error == errno.EINVAL:  # a kernel before 6.1: new faults get huge pages, khugepaged the rest
        state.status = "advised only: this kernel has no MADV_COLLAPSE, so khugepaged collapses the heap over time"
        return state
    # a range that could not be collapsed (no free 2 MB block, say) stays on 4 kB pages: the count says so
    state.status = f"{huge_bytes(start, end) >> 20} of {(end - start) >> 20} MB of the heap on huge pages"
    return state


@functools.cache
def _unavailable() -> str | None:
    """Why this process's heap cannot be put on huge pages, or None (the same for the life of
    the process: the kernel's setting and the allocator, read once)."""
    mode = kernel_mode()
    if mode is None:
        return "the kernel has no transparent huge pages"
    if mode == "never":
        return "the kernel's transparent huge pages are set to never"
    if not allocator.glibc():
        return "not glibc malloc"
    loaded = allocator.loaded_allocator()
    if loaded != "system":
        return f"{loaded} allocates outside glibc's heap (its own setting: MALLOC_CONF=thp:always for jemalloc)"
    return None
