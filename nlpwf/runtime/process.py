"""One training process's set-up, before any data or model: its place in the job, its threads
and cores, its allocator, the process group, and the precision every rank runs in.

`set_up` does it all in one call and returns what the process got (`ProcessEnv`), which the
training stage logs and records in metrics.json. `python -m nlpwf.runtime.process` shows what
this machine offers a training process: its cores, the allocator in use and the line to
preload a faster one, and the DDP backend.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from omegaconf import DictConfig

from nlpwf.runtime import affinity, allocator, collective, contract, isa, threads


@dataclass
class ProcessEnv:
    rank: contract.Rank
    local_world: int        # training processes on this node
    threads: int            # OpenMP and torch threads of this process
    cores: list[int]        # the CPUs it runs on
    affinity: str           # how they were chosen: pinned, external or off (runtime.affinity)
    allocator: str          # as runtime.allocator.prepare names it
    backend: str | None     # the process group's (gloo, ccl); None in a job of one process
    precision: str          # fp32 or bf16: the `precision` option resolved, the same on every rank
    cpus: list[str]         # the CPU and ISA of every rank, each kind once


def local_world_size(cfg: DictConfig, rank: contract.Rank) -> int:
    """Processes on this machine: torchrun and nlpwf's workers say it; Azure ML does not (its
    contract has no LOCAL_WORLD_SIZE), so a rank of a multi-process job takes it from the job."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or (cfg.compute.processes_per_node if rank.world_size > 1 else 1))


def set_up(cfg: DictConfig) -> ProcessEnv:
    """Set this process up from the job's config (`compute`, `perf`, `precision`,
    `training.ddp_timeout`). Every rank of a job calls it: it joins the process group, and the
    ranks agree on `precision=auto` and gather their CPUs."""
    rank = contract.from_env() or contract.Rank()
    if not rank.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    local_world = local_world_size(cfg, rank)
    n_threads = threads.set_threads(int(os.environ.get("OMP_NUM_THREADS")
                                        or threads.threads_per_process(cfg.compute.threads_per_process, local_world)))
    perf = cfg.get("perf") or {}
    slot, slots = affinity.slot_on_machine(rank, local_world)
    cores, placed = affinity.place(slot, slots, n_threads, enabled=perf.get("affinity", True) is not False)
    memory = allocator.prepare(perf.get("keep_freed_memory", True), announce=slot == 0)
    backend = collective.init_process_group(rank, cfg.training.ddp_timeout) if rank.world_size > 1 else None
    # On the nodes that run the job, and the same on every rank (auto follows the least capable node).
    precision = isa.resolve(cfg.precision.name, announce=rank.local_rank == 0)
    cpus = sorted(set(collective.gather(isa.detect().summary())))
    return ProcessEnv(rank=rank, local_world=local_world, threads=n_threads, cores=cores, affinity=placed, allocator=memory,
                      backend=backend, precision=precision, cpus=cpus)


def main() -> None:
    env = allocator.preload_env()
    print(f"cores: {len(affinity.physical_core_groups(os.sched_getaffinity(0)))} physical, {os.cpu_count()} logical")
    loaded = allocator.loaded_allocator()
    kept = ", training keeps freed memory (perf.keep_freed_memory)" if loaded == "system" and allocator.glibc() else ""
    print(f"allocator in this process: {loaded}{kept}")
    none = "preload: no jemalloc or tcmalloc installed (apt-get install libjemalloc2)"
    print(f"preload: export LD_PRELOAD={env['LD_PRELOAD']}" if env else none)
    print(f"DDP backend: {collective.backend()}")
    print(f"CPU: {isa.detect().summary()}")


if __name__ == "__main__":
    main()
