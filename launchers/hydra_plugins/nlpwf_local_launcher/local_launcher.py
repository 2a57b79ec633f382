"""Runs sweep points one after the other on this machine, then writes the sweep summary.

A point that needs several processes starts them itself (nlpwf.stages.train): a plain run,
which Hydra executes without any launcher, must behave the same as a sweep point. The work is
in nlpwf.runtime.launching, imported only when a sweep starts: Hydra imports this module at
every start to discover plugins.
"""
from __future__ import annotations

from typing import Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class NlpwfLocalLauncher(Launcher):
    def __init__(self) -> None:
        self.sweep = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from nlpwf.runtime.launching import Sweep

        self.sweep = Sweep(hydra_context, task_function, config)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from nlpwf.runtime.launching import run_here

        return run_here(self.sweep, job_overrides, initial_job_idx)
