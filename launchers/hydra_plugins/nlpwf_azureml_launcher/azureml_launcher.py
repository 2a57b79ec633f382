"""Every job of a run or a sweep becomes an Azure ML command job (or its dry run or emulation).

Like Hydra's own remote launchers, this launcher decides where the task runs: it composes
each sweep point here, makes its job dir, builds the Azure ML job whose command runs the
task function on the nodes, and dry-runs, emulates or submits it (nlpwf.azureml.launch).
That module, and Azure's SDK behind it, are imported only when a sweep starts: Hydra imports
this module at every start to discover plugins.
"""
from __future__ import annotations

from typing import Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class NlpwfAzureMLLauncher(Launcher):
    def __init__(self, **settings) -> None:
        self.settings: DictConfig = OmegaConf.create(settings)
        self.sweep = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from nlpwf.azureml.launch import check_settings
        from nlpwf.runtime.launching import Sweep

        check_settings(self.settings)  # before the sweeper writes multirun.yaml: a secret is in no file
        self.sweep = Sweep(hydra_context, task_function, config)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from nlpwf.azureml.launch import launch

        return launch(self.sweep, self.settings, job_overrides, initial_job_idx)
