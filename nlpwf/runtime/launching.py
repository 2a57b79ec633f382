"""What nlpwf's two Hydra launchers (launchers/hydra_plugins) share: the state of one sweep,
composing a sweep point's config, running a point through Hydra's run_job, and adding each
batch to the sweep's summary.csv.

Only Hydra's public API is used (load_sweep_config, run_job, setup_globals, configure_log):
the job dir, `.hydra/` and the job's log file are then exactly what Hydra makes for any job.
The local launcher runs the user's task in this process (`run_here`); the Azure ML launcher
(nlpwf.azureml.launch) runs its own preparation step through the same `run_point`, and the
task later on the job's nodes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from nlpwf.results.summary import Summary

log = logging.getLogger(__name__)


@dataclass
class Sweep:
    """One launcher's view of a sweep, from Hydra's `setup` to the last batch. Hydra sets a
    launcher up once and then asks it for every batch (Optuna asks several times), so the
    summary accumulates here."""

    hydra_context: HydraContext
    task_function: TaskFunction
    config: DictConfig
    summary: Summary = field(init=False)

    def __post_init__(self) -> None:
        # objective: nlpwf's key; a plain Hydra app has none, and its summary has no "best" line
        self.summary = Summary(self.config.hydra.sweep.dir, self.config.get("objective"))


def start_batch(sweep: Sweep, jobs: int, where: str) -> None:
    """Hydra's globals and logging for the launcher itself, and the sweep dir, before a batch."""
    setup_globals()
    configure_log(sweep.config.hydra.hydra_logging, sweep.config.hydra.verbose)
    Path(str(sweep.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    log.info("launching %d job(s) %s, sweep dir %s", jobs, where, sweep.config.hydra.sweep.dir)


def compose(sweep: Sweep, overrides: Sequence[str], idx: int) -> DictConfig:
    """Sweep point `idx`: the primary config with its overrides, numbered as Hydra numbers jobs."""
    log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
    sweep_config = sweep.hydra_context.config_loader.load_sweep_config(sweep.config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    return sweep_config


def run_point(sweep: Sweep, sweep_config: DictConfig, task_function: TaskFunction,
              hydra_context: HydraContext | None = None) -> JobReturn:
    """`task_function` as a job of the sweep: its dir (sweep dir / subdir), `.hydra/`, job log.
    The launcher's own logging is back in place afterwards, as Hydra's basic launcher does."""
    try:
        return run_job(hydra_context=hydra_context or sweep.hydra_context, task_function=task_function,
                       config=sweep_config, job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    finally:
        configure_log(sweep.config.hydra.hydra_logging, sweep.config.hydra.verbose)


def run_here(sweep: Sweep, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    """The local launcher's batch: each point's task in this process, one after the other (a
    point of several processes starts them itself, see nlpwf.stages.train), then the summary."""
    start_batch(sweep, len(job_overrides), "on this machine")
    runs = [run_point(sweep, compose(sweep, overrides, initial_job_idx + i), sweep.task_function)
            for i, overrides in enumerate(job_overrides)]
    record(sweep, runs)
    return runs


def record(sweep: Sweep, runs: list[JobReturn], labels: Sequence[str | None] | None = None) -> None:
    """A finished batch into summary.csv. `labels` name what a launcher knows and Hydra's status
    does not say (e.g. DRY_RUN, SUBMITTED); see results.summary.row."""
    sweep.summary.add(runs, labels)


def outcome_into(run: JobReturn, outcome: Any) -> None:
    """How a job ended, into its JobReturn: an exception fails it, anything else is its return
    value (what sweepers read)."""
    if isinstance(outcome, BaseException):
        run.status = JobStatus.FAILED
    else:
        run.status = JobStatus.COMPLETED
    run.return_value = outcome

