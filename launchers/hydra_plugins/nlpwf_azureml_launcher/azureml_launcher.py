"""Every job of a run or a sweep becomes an Azure ML command job (or its dry run or emulation).

The launcher itself stays generic: it runs each job through Hydra's `run_job` here, in
order, as Hydra's basic launcher does. nlpwf's task sees this launcher in its Hydra config and,
instead of training, builds the Azure ML job (nlpwf.azureml): a dry run or an emulation
ends there; a real submission comes back as a `Submission`, which the launcher then sends
and watches in parallel for the whole batch. Azure's SDK is imported only on that path.
"""
from __future__ import annotations

import logging
from typing import Sequence

from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


class NlpwfAzureMLLauncher(Launcher):
    def __init__(self, **settings) -> None:
        self.settings: DictConfig = OmegaConf.create(settings)
        self.config = self.hydra_context = self.task_function = None
        self.summary = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from nlpwf.azureml import pending
        from nlpwf.sweep import Summary

        runs = [self._run(overrides, initial_job_idx + i) for i, overrides in enumerate(job_overrides)]
        if pending(runs):
            from nlpwf.azureml.submit import submit_all

            submit_all(runs, self.settings)
        if self.summary is None:  # one launcher serves every batch of a sweep (Optuna asks several times)
            self.summary = Summary(self.config.hydra.sweep.dir, self.config.get("objective"))
        self.summary.add(runs)
        return runs

    def _run(self, overrides: Sequence[str], idx: int) -> JobReturn:
        """One job through Hydra's run_job: its dir, .hydra/ and logging here, whatever runs it."""
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        log.info("Azure ML job #%d: %s", idx, " ".join(filter_overrides(overrides)))
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
            sweep_config.hydra.job.num = idx
        return run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=sweep_config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
