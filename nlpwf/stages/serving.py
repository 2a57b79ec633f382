"""What the serving stages (evaluate, predict, quantize, benchmark) share."""
from __future__ import annotations

from omegaconf import DictConfig

from nlpwf.runtime import threads


def serving_threads(cfg: DictConfig) -> int:
    """One process on the node: all its cores, unless compute.threads_per_process says otherwise."""
    return threads.set_threads(threads.threads_per_process(cfg.compute.threads_per_process, 1))
