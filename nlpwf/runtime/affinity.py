"""Which cores each training process of a node runs on.

Several processes on a node get disjoint sets of physical cores (SMT siblings together, in
contiguous blocks), so their OpenMP pools never fight over a core. A process someone already
narrowed (taskset, numactl, a cluster agent) is left as it is.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from nlpwf.runtime.contract import Rank

log = logging.getLogger(__name__)


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


def slot_on_machine(rank: Rank, local_world: int) -> tuple[int, int]:
    """This process's index among the training processes sharing this machine, and their number.
    A job whose master is on loopback runs every rank here (the local launcher emulating
    several nodes): all ranks share out the cores, not only the ranks of one "node"."""
    if rank.world_size > 1 and os.environ.get("MASTER_ADDR", "") in ("127.0.0.1", "localhost", "::1"):
        return rank.rank, rank.world_size
    return rank.local_rank, local_world


def place(slot: int, slots: int, threads: int, enabled: bool = True) -> tuple[list[int], str]:
    """Pin this process, the `slot`-th of `slots` on this machine (`slot_on_machine`), to its share
    of the cores. Returns its cores and how they were chosen: "pinned" here, "external" (narrowed
    before nlpwf started) or "off" (`enabled` false)."""
    cpus = os.sched_getaffinity(0)
    if not enabled:
        mode = "off"
    elif pinned_externally(cpus):
        mode = "external"
    else:
        cpus = cores_for_rank(slot, slots, cpus)
        pin_process(cpus)
        mode = "pinned"
    if threads > len(cpus):
        log.warning("%d threads on %d CPU(s): oversubscribed; set compute.threads_per_process=%d", threads, len(cpus), len(cpus))
    return sorted(cpus), mode
