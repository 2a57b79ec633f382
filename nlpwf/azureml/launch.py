"""The Azure ML launcher's batch (launchers/hydra_plugins/nlpwf_azureml_launcher): every sweep
point becomes an Azure ML job built here, which runs the user's task function on its nodes.

1. Each point is composed as Hydra composes it, and Hydra's run_job makes its job dir, `.hydra/`
   and log, with the launcher's own preparation as the task (Preparation): validate the job,
   write its code snapshot and payload, write job.yaml. A mistake the user can fix ends the
   launch there, as one line and exit code 2, before anything is sent (as nlpwf's task does
   for a job run here).
2. The batch's jobs are then dry-run (nothing sent), emulated here one after the other, or
   submitted and watched in parallel. Each outcome goes into the point's JobReturn: what the
   task returned on the nodes, or the exception that failed the job.
3. The batch is added to summary.csv, labelled DRY_RUN or SUBMITTED where no result exists yet.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from nlpwf.azureml import emulate, secrets, storage, submit
from nlpwf.azureml import job as azjob
from nlpwf.azureml.job import JobSpec
from nlpwf.errors import UserError
from nlpwf.runtime import launching

log = logging.getLogger(__name__)


class JobCallbacksRunOnTheNodes:
    """Hydra's job callbacks (hydra.callbacks) belong around the task, and the task runs on the
    nodes, which get them in the payload. Around the launcher's preparation they would run a
    second time for every job, so there they do nothing."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        pass

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        pass


@dataclass
class Preparation:
    """The task run_job runs for the launcher: builds the point's Azure ML job in its job dir."""

    sweep_config: DictConfig   # the point's config with Hydra's node; run_job sets its output dir
    task_function: TaskFunction
    callbacks: Any

    def __call__(self, task_cfg: DictConfig) -> JobSpec:
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            return azjob.prepare(self.sweep_config, task_cfg, job_dir, self.sweep_config.hydra.launcher,
                                 self.task_function, self.callbacks)
        except UserError as e:  # SystemExit passes through run_job and Hydra: nothing is sent
            print(f"nlpwf: error: {e}", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)


def check_settings(settings: DictConfig) -> None:
    """The launcher's own settings, checked when Hydra sets the launcher up, before the sweeper
    writes multirun.yaml and before any job dir exists: a credential in the jobs' environment
    is refused as one line (secrets.refuse_credentials), exit 2, with nothing written."""
    try:
        secrets.refuse_credentials(settings.get("environment_variables") or {})
        secrets.job_environment(settings.get("key_vault"), settings.get("secrets"))
    except UserError as e:
        print(f"nlpwf: error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


def launch(sweep: launching.Sweep, settings: DictConfig, job_overrides: Sequence[Sequence[str]],
           initial_job_idx: int) -> list[JobReturn]:
    """One batch of the sweep, one JobReturn per point in order (see the module's docstring).
    `settings`: the launcher's own (dry_run, emulate, wait, ...); each job is built from its
    point's hydra.launcher, which is the same unless the config interpolates it."""
    mode = ("as Azure ML dry runs" if settings.dry_run else "as emulated Azure ML jobs" if settings.emulate
            else "as Azure ML jobs")
    launching.start_batch(sweep, len(job_overrides), mode)
    preparing = HydraContext(config_loader=sweep.hydra_context.config_loader, callbacks=JobCallbacksRunOnTheNodes())
    runs: list[JobReturn] = []
    for i, overrides in enumerate(job_overrides):
        sweep_config = launching.compose(sweep, overrides, initial_job_idx + i)
        preparation = Preparation(sweep_config, sweep.task_function, sweep.hydra_context.callbacks)
        runs.append(launching.run_point(sweep, sweep_config, preparation, preparing))
    # A point whose preparation failed (not a user's mistake: those exit above) stays FAILED with its exception.
    ready = [(run, run.return_value) for run in runs if run.status == JobStatus.COMPLETED]
    label = None
    if settings.dry_run:
        for run, spec in ready:
            log.info("dry run: Azure ML job %s written to %s (nothing submitted)", spec.name, spec.job_yaml)
            launching.outcome_into(run, None)
        label = "DRY_RUN"
    elif settings.emulate:
        for run, spec in ready:  # one after the other: each one uses every core of this machine
            settle(run, spec, emulated(spec, settings))
    else:
        outcomes = submit_batch([spec for _, spec in ready], settings) if ready else []
        for (run, spec), outcome in zip(ready, outcomes):
            settle(run, spec, outcome)
        label = None if settings.wait else "SUBMITTED"  # it may still fail in Azure
    launching.record(sweep, runs, [label] * len(runs))
    return runs


def submit_batch(specs: list[JobSpec], settings: DictConfig, ws=None) -> list:
    """submit.execute, after the batch's local inputs are uploaded: each distinct local path once
    (jobs submitted in parallel would otherwise each upload it), and each job's spec then names
    the uploaded copy (<job dir>/azureml/job.submitted.yaml; job.yaml keeps the local path)."""
    if any(i.local for spec in specs for i in spec.inputs):
        try:
            ws = ws or submit.connect(settings)
            upload_inputs(ws, specs, settings.get("datastore") or "workspaceblobstore")
        except Exception as e:  # noqa: BLE001 - e.g. not signed in: every job of the batch fails with it
            error = RuntimeError(f"nothing submitted: uploading the jobs' inputs failed: {type(e).__name__}: {str(e).strip()}")
            return [error] * len(specs)
    return submit.execute(specs, settings, ws=ws)


def upload_inputs(ws, specs: list[JobSpec], datastore: str = "workspaceblobstore") -> dict[str, str]:
    """Upload the batch's local inputs once each (storage.upload, to `datastore`, where the SDK
    would put them); returns {local path: azureml:// URI}."""
    import yaml

    uploaded: dict[str, str] = {}
    for spec in specs:
        doc = yaml.safe_load(spec.job_yaml.read_text())
        for job_input in spec.inputs:
            if job_input.local:
                if job_input.path not in uploaded:
                    uploaded[job_input.path] = storage.upload(ws, Path(job_input.path), datastore)
                    log.info("uploaded %s to %s", job_input.path, uploaded[job_input.path])
                doc["inputs"][job_input.name]["path"] = uploaded[job_input.path]
        submitted = spec.job_yaml.with_name("job.submitted.yaml")
        submitted.write_text(yaml.safe_dump(doc, sort_keys=False))
        spec.job_yaml = submitted
    return uploaded


def settle(run: JobReturn, spec: JobSpec, outcome: Any) -> None:
    """A sent or emulated job's outcome (return value or exception) into its point's JobReturn."""
    if isinstance(outcome, BaseException):  # said now: the sweeper raises it only after the whole batch
        log.error("Azure ML job %s (job dir %s) failed: %s", spec.name, spec.job_dir, outcome)
    launching.outcome_into(run, outcome)


def emulated(spec: JobSpec, settings: DictConfig) -> Any:
    """The emulated job's return value, or the exception that failed it (Ctrl-C stops the launch)."""
    try:
        return emulate.run(spec, settings)
    except UserError as e:  # the job refused its input: one line and exit 2, as a job run here says it
        print(f"nlpwf: error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - a failed job is a result of the batch, like a failed task
        return e
