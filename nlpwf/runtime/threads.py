"""OpenMP threads per process: a node's physical cores shared out, never oversubscribed."""
from __future__ import annotations

import os

import psutil
from omegaconf import DictConfig


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def threads_per_process(configured: int | None, processes_on_node: int, cores: int | None = None) -> int:
    """The configured count, else the node's physical cores (this machine's when `cores` is
    None) divided among its processes."""
    if configured:
        return int(configured)
    return max(1, int(cores or physical_cores()) // max(1, processes_on_node))


def set_threads(n: int) -> int:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return n


def serving_threads(cfg: DictConfig) -> int:
    """A serving stage's threads: one process on the node, so all its cores, unless
    compute.threads_per_process says otherwise. Sets them and returns the count."""
    return set_threads(threads_per_process(cfg.compute.threads_per_process, 1))
