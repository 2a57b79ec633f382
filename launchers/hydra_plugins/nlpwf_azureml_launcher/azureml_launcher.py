"""Every job of a run or a sweep becomes an Azure ML command job (or its dry run or emulation).

The launcher itself stays generic: it runs each job through Hydra's `run_job` here, in
order, like the basic launcher. nlpwf's task sees this launcher in its Hydra config and,
instead of training, builds the Azure ML job (nlpwf.azureml): a dry run or an emulation
ends there; a real submission comes back as a `Submission`, which the launcher then sends
and watches in parallel for the whole batch. Azure's SDK is imported only on that path.
"""
from __future__ import annotations

import logging
from typing import Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.utils import JobReturn
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class NlpwfAzureMLLauncher(BasicLauncher):
    def __init__(self, **settings) -> None:
        super().__init__()
        self.settings: DictConfig = OmegaConf.create(settings)
        self.summary = None

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from nlpwf.azureml import pending
        from nlpwf.sweep import Summary

        runs = list(super().launch(job_overrides, initial_job_idx))
        if pending(runs):
            from nlpwf.azureml.submit import submit_all

            submit_all(runs, self.settings)
        if self.summary is None:  # one launcher serves every batch of a sweep (Optuna asks several times)
            self.summary = Summary(self.config.hydra.sweep.dir, self.config.get("objective"))
        self.summary.add(runs)
        return runs
