"""CPU performance settings for one training process, and a record that they took effect.

`setup_process` runs before any work: it pins the process to its own cores (several processes
on a node get disjoint core sets, so their OpenMP pools never fight over a core) and reports
which allocator is loaded. `attach` adds to a Trainer: Intel Extension for PyTorch when it is
installed and compatible, an optional DDP gradient-compression hook, and a recorder of what the
run actually did (activation dtype inside autocast, padded batch shapes, threads and cores per
rank), which `report` returns for metrics.json. The settings themselves live in the `perf`
config node; bf16 autocast, dynamic padding, length grouping, `torch_compile` and
`ddp_bucket_cap_mb` are plain `precision` / `dataset` / `training` settings.
"""
from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nlpwf.errors import UserError
from nlpwf.runtime import collective

log = logging.getLogger(__name__)

ALLOCATORS = {"jemalloc": "libjemalloc.so*", "tcmalloc": "libtcmalloc*.so*"}
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


# ---- cores and threads -------------------------------------------------------------------

def physical_core_groups(cpus: set[int]) -> list[list[int]]:
    """The CPUs in `cpus` grouped by physical core (SMT siblings together), in core order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for cpu in sorted(cpus):
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            key = (int((topo / "physical_package_id").read_text()), int((topo / "core_id").read_text()))
        except (OSError, ValueError):
            key = (0, cpu)  # no topology (containers, non-Linux): treat each CPU as a core
        groups.setdefault(key, []).append(cpu)
    return [groups[k] for k in sorted(groups, key=lambda k: min(groups[k]))]


def cores_for_rank(local_rank: int, local_world: int, cpus: set[int]) -> set[int]:
    """Disjoint CPU sets for the processes of one node: physical cores are dealt out in
    contiguous blocks (neighbouring cores share caches). With more processes than cores,
    processes share cores round-robin rather than fail."""
    cores = physical_core_groups(cpus)
    per = max(1, len(cores) // max(1, local_world))
    start = (local_rank * per) % len(cores)
    return {cpu for core in cores[start:start + per] for cpu in core}


def pin_process(cpus: set[int]) -> None:
    """Pin every thread of this process: sched_setaffinity(0) would move only the calling
    thread, and OpenMP or tokenizer threads may already exist."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):
            pass  # the thread ended meanwhile, or a sandbox forbids it: affinity is an optimisation


def pinned_externally(cpus: set[int]) -> bool:
    """Someone (taskset, numactl, a cluster agent) already narrowed this process: respect it."""
    return len(cpus) < (os.cpu_count() or len(cpus))


# ---- allocator ---------------------------------------------------------------------------

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


# ---- process set-up ----------------------------------------------------------------------

@dataclass
class ProcessSettings:
    threads: int
    cores: list[int]
    affinity: str  # "pinned", "external" or "off"
    allocator: str
    ipex: str = "off"
    comm_hook: str = "none"
    unpad: str = "off"
    extras: dict = field(default_factory=dict)


def slot_on_machine(rank, local_world: int) -> tuple[int, int]:
    """This process's index among the training processes sharing this machine, and their number.
    A job whose master is on loopback runs every rank here (the local launcher emulating
    several nodes): all ranks share out the cores, not only the ranks of one "node"."""
    if rank.world_size > 1 and os.environ.get("MASTER_ADDR", "") in ("127.0.0.1", "localhost", "::1"):
        return rank.rank, rank.world_size
    return rank.local_rank, local_world


def setup_process(cfg, rank, local_world: int, threads: int) -> ProcessSettings:
    """Pin this process and note its allocator. `cfg` is the `perf` node (may be None), `rank`
    a distributed.Rank."""
    local_rank, local_world = slot_on_machine(rank, local_world)
    cpus = os.sched_getaffinity(0)
    if cfg is not None and cfg.get("affinity", True) is False:
        mode = "off"
    elif pinned_externally(cpus):
        mode = "external"
    else:
        cpus = cores_for_rank(local_rank, local_world, cpus)
        pin_process(cpus)
        mode = "pinned"
    if threads > len(cpus):
        log.warning("%d threads on %d CPU(s): oversubscribed; set compute.threads_per_process=%d", threads, len(cpus), len(cpus))
    allocator = loaded_allocator()
    if allocator == "system":
        if (cfg is None or cfg.get("keep_freed_memory", True)) and keep_freed_memory():
            allocator = "system, freed memory kept"
        if local_rank == 0:
            hint = find_allocator()
            log.info("allocator: %s%s", allocator.replace("system", "system malloc"),
                     f" ({hint} is installed: see docs/performance.md to preload it)" if hint else "")
    return ProcessSettings(threads=threads, cores=sorted(cpus), affinity=mode, allocator=allocator)


# ---- Trainer add-ons ---------------------------------------------------------------------

def ipex_module():
    """IPEX when installed and built for this torch (it refuses other minor versions), else None."""
    try:
        import intel_extension_for_pytorch as ipex
    except Exception:  # ImportError, or an incompatible build failing on import
        return None
    if ipex.__version__.split(".")[:2] != torch.__version__.split(".")[:2]:
        return None
    return ipex


def apply_ipex(trainer, bf16: bool) -> str:
    """ipex.optimize the model with its optimizer, as transformers 4's `use_ipex` did. The
    Trainer then wraps (DDP) and autocasts the optimized model as usual."""
    ipex = ipex_module()
    if ipex is None:
        log.info("Intel Extension for PyTorch is not installed (or not built for torch %s): using native PyTorch", torch.__version__)
        return "absent"
    trainer.create_optimizer()
    dtype = torch.bfloat16 if bf16 else torch.float32
    trainer.model.train()
    trainer.model, trainer.optimizer = ipex.optimize(trainer.model, optimizer=trainer.optimizer, dtype=dtype, inplace=True, level="O1")
    trainer.model_wrapped = trainer.model
    log.info("Intel Extension for PyTorch %s: model and optimizer optimized for %s", ipex.__version__, dtype)
    return f"ipex {ipex.__version__}"


def comm_hook(name: str):
    """A torch DDP communication hook by name: gradients are cast for the all-reduce and back."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hooks = {"allreduce": default_hooks.allreduce_hook, "bf16": default_hooks.bf16_compress_hook,
             "fp16": default_hooks.fp16_compress_hook}
    if name not in hooks:
        raise UserError(f"perf.ddp_comm_hook={name}: use one of {', '.join(hooks)} or null")
    return hooks[name]


def main() -> None:
    """`python -m nlpwf.perf`: what this machine offers, and the line to preload an allocator."""
    env = preload_env()
    print(f"cores: {len(physical_core_groups(os.sched_getaffinity(0)))} physical, {os.cpu_count()} logical")
    allocator = loaded_allocator()
    kept = ", training keeps freed memory (perf.keep_freed_memory)" if allocator == "system" and glibc() else ""
    print(f"allocator in this process: {allocator}{kept}")
    none = "preload: no jemalloc or tcmalloc installed (apt-get install libjemalloc2)"
    print(f"preload: export LD_PRELOAD={env['LD_PRELOAD']}" if env else none)
    print(f"IPEX: {'available' if ipex_module() else 'not installed or not built for torch ' + torch.__version__}")
    print(f"DDP backend: {collective.backend()}")


if __name__ == "__main__":
    main()
