"""Runs sweep points one after the other on this machine, then writes the sweep summary.

A point that needs several processes starts them itself (nlpwf.cli): a plain run, which
Hydra executes without any launcher, must behave the same as a sweep point.
"""
from __future__ import annotations

from typing import Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.utils import JobReturn


class NlpwfLocalLauncher(BasicLauncher):
    def __init__(self) -> None:
        super().__init__()
        self.summary = None

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from nlpwf.sweep import Summary

        runs = super().launch(job_overrides, initial_job_idx)
        if self.summary is None:  # one launcher serves every batch of a sweep (Optuna asks several times)
            self.summary = Summary(self.config.hydra.sweep.dir, self.config.get("objective"))
        self.summary.add(runs)
        return runs
