"""Send a batch of Azure ML jobs and, with `wait`, watch them to the end (batch control).

Jobs of a batch are submitted and watched in parallel threads: a sweep's points then run
on Azure at the same time instead of one after the other. What is submitted is each job's
job.yaml loaded back by the SDK, so a dry run shows exactly what would be sent. A finished
job's result is what its task returned on the nodes (payload.RETURN_FILE in its outputs),
brought back by download.py.

Waiting is bounded: the job carries a time limit on its running time (job.py: limits.timeout),
a job that has not started running `queue_timeout_s` after its submission is cancelled (a job
Azure puts back in the queue after it ran, e.g. a preempted low-priority job, is followed, not
cancelled), a transient HTTP error while polling is retried (azure-core's RetryPolicy in the
MLClient, then the poll loop itself), and when the sweep aborts (a failed job under a sweeper
that stops at the first failure, or Ctrl-C) the batch's other jobs are cancelled (`cancel_on_abort`).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from omegaconf import DictConfig

from nlpwf.azureml import download, workspace
from nlpwf.azureml import job as azjob
from nlpwf.azureml.job import JobSpec
from nlpwf.results import files

log = logging.getLogger(__name__)

TERMINAL = {"Completed", "Failed", "Canceled", "NotResponding", "Paused"}
# Accepted but not running on nodes: waiting for quota or nodes, building the image, ... A job
# in any other status (Running, Finalizing, CancelRequested) has run.
WAITING = {"NotStarted", "Queued", "Preparing", "Provisioning", "Starting"}
RESULTS_OUTPUT = azjob.RESULTS_OUTPUT
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


def ensure_cluster(ml_client, cluster: dict, vm_size: str | None, nodes: int) -> None:
    """Create the AmlCompute cluster when it is missing and the compute option allows it."""
    from azure.ai.ml.entities import AmlCompute
    from azure.core.exceptions import ResourceNotFoundError

    try:
        ml_client.compute.get(cluster["name"])
        return
    except ResourceNotFoundError:
        if not cluster.get("create_if_missing"):
            raise RuntimeError(f"the workspace has no cluster {cluster['name']}: create it, or set "
                               "compute.cluster.create_if_missing=true") from None
    log.info("creating cluster %s (%s, %d-%d nodes)", cluster["name"], vm_size, cluster.get("min_instances", 0),
             cluster.get("max_instances", nodes))
    ml_client.compute.begin_create_or_update(AmlCompute(
        name=cluster["name"], size=vm_size, min_instances=cluster.get("min_instances", 0),
        max_instances=cluster.get("max_instances", nodes), tier=cluster.get("tier", "dedicated"),
        idle_time_before_scale_down=cluster.get("idle_time_before_scale_down", 1800),
    )).result()


def submit_one(ml_client, spec: JobSpec) -> str:
    created = ml_client.jobs.create_or_update(azjob.load(spec.job_yaml))
    # Printed, not only logged: the user needs these to find the job.
    print(f"submitted Azure ML job {created.name}: {created.studio_url}", flush=True)
    return created.name


def job_status(ml_client, name: str) -> str:
    status = ml_client.jobs.get(name).status
    return str(getattr(status, "value", status))  # the SDK answers with a str enum; messages want "Failed"


def transient(error: BaseException) -> bool:
    """An HTTP error worth polling again for (azure-core's RetryPolicy has already retried it)."""
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    if isinstance(error, (ServiceRequestError, ServiceResponseError)):
        return True
    return isinstance(error, HttpResponseError) and getattr(error, "status_code", None) in TRANSIENT_STATUS


def error_text(ml_client, name: str, status: str) -> str:
    """Azure's own account of why a job ended badly."""
    if status != "Failed":
        return f"Azure ML job {name} ended {status}"
    try:  # on a finished job, stream() only fetches the run's details and raises with its error
        ml_client.jobs.stream(name)
    except Exception as e:  # noqa: BLE001 - the SDK's JobException carries Azure's error JSON
        return f"Azure ML job {name} failed: {e}"
    return f"Azure ML job {name} failed (Azure gave no error details; see its logs in Studio)"


def cancel(ml_client, name: str) -> bool:
    """Ask Azure ML to cancel a job (without waiting for it to stop); whether the request went through."""
    try:
        ml_client.jobs.begin_cancel(name)
        return True
    except Exception as e:  # noqa: BLE001 - a job that ended meanwhile cannot be cancelled; say so and go on
        log.warning("could not cancel Azure ML job %s: %s", name, str(e).strip().splitlines()[0] if str(e).strip() else e)
        return False


class Stopped(Exception):
    """The user stopped watching (Ctrl-C)."""


class QueueTimeout(RuntimeError):
    """The job waited for nodes longer than queue_timeout_s and was cancelled."""


def _setting(settings: DictConfig, key: str, default=None):
    value = settings.get(key, default)
    return default if value is None else value


def poll(ml_client, name: str, settings: DictConfig, stop: threading.Event, since: float) -> str:
    """Poll until the job ends: its final status. A job that has not yet run (no status but
    WAITING seen) queue_timeout_s after `since`, its submission, is cancelled (QueueTimeout); once
    it has run, a return to the queue (a preempted node) is followed, and limits.timeout bounds
    it. Transient HTTP errors are tolerated for up to `transient_errors_max` polls in a row."""
    queue_timeout = _setting(settings, "queue_timeout_s")
    tolerated = int(_setting(settings, "transient_errors_max", 10))
    errors, status, previous, ran = 0, None, None, False
    while True:
        try:
            previous, status = status, job_status(ml_client, name)
            errors = 0
        except Exception as e:
            if not transient(e) or errors >= tolerated:
                raise
            errors += 1
            log.warning("polling Azure ML job %s: transient error (%d/%d), trying again: %s", name, errors, tolerated,
                        str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        if status in TERMINAL:
            return status
        if ran and status in WAITING and previous not in WAITING:
            log.warning("Azure ML job %s is %s again after running (its nodes were preempted?): following it", name, status)
        ran = ran or (status is not None and status not in WAITING)
        if not ran and status in WAITING and queue_timeout is not None and time.monotonic() - since > float(queue_timeout):
            cancel(ml_client, name)
            raise QueueTimeout(f"Azure ML job {name} was still {status} after hydra.launcher.queue_timeout_s="
                               f"{queue_timeout:g} and was cancelled: check the cluster's quota and max_instances in Studio")
        if stop.wait(float(settings.poll_interval_s)):
            raise Stopped(name)


def wait_one(ws, spec: JobSpec, settings: DictConfig, stream: bool, stop: threading.Event,
             since: float | None = None):
    """Block until the job ends; its task's return value, or an exception describing the failure."""
    name, ml_client = spec.name, ws.ml_client
    since = time.monotonic() if since is None else since
    if stream:
        try:
            ml_client.jobs.stream(name)
        except Exception as e:  # noqa: BLE001 - a failure's details come from error_text below
            log.debug("stream of %s ended: %s", name, e)
        if job_status(ml_client, name) not in TERMINAL:  # the SDK ends its stream early only when interrupted
            raise Stopped(name)
    status = poll(ml_client, name, settings, stop, since)
    if status != "Completed":
        return RuntimeError(error_text(ml_client, name, status))
    got = download.download_results(ws, spec, settings)
    log.info("Azure ML job %s: downloaded %d result file(s) to %s", name, len(got),
             spec.job_dir / azjob.AZURE_DIR / download.RESULTS_DIR)
    value = download.task_return(spec.job_dir, f"Azure ML job {name}")
    log.info("Azure ML job %s completed: its task returned %r", name, value)
    if settings.get("register_model"):
        register_model(ml_client, name, str(settings.register_model))
    return value


def register_model(ml_client, job_name: str, model_name: str):
    """The job's model/ (in its results output) as an Azure ML model asset; its version is printed."""
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Model

    model = ml_client.models.create_or_update(Model(
        path=f"azureml://jobs/{job_name}/outputs/{RESULTS_OUTPUT}/paths/{files.MODEL_DIR}",
        name=model_name, type=AssetTypes.CUSTOM_MODEL,
        description=f"model/ of nlpwf's Azure ML job {job_name} (a transformers save_pretrained folder)",
        tags={"nlpwf_job": job_name},
    ))
    print(f"registered model {model.name} version {model.version} from Azure ML job {job_name}", flush=True)
    return model


def aborts_on_failure() -> bool:
    """Whether the running sweep stops at its first failed job (Optuna's sweeper with its default
    max_failure_rate 0.0), so that the batch's other jobs would run for nothing."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    sweeper = HydraConfig.get().get("sweeper") or {}
    target = str(sweeper.get("_target_", ""))
    return "optuna" in target.lower() and float(sweeper.get("max_failure_rate", 0.0) or 0.0) == 0.0


def connect(settings: DictConfig):
    """The workspace of the launcher's settings, with its retry settings."""
    return workspace.connect(settings.workspace, retry=workspace.retry_kwargs(settings))


def execute(specs: list[JobSpec], settings: DictConfig, ws=None, abort_on_failure: bool | None = None) -> list:
    """Submit every job (and wait, if asked). One outcome per job: its task's return value (None
    when not waiting) or an exception. Clusters are checked once, before the first submission.
    `abort_on_failure`: the sweep ends at the first failed job (default: ask the running sweeper);
    then, and on Ctrl-C, the batch's other jobs are cancelled when `cancel_on_abort` is set."""
    try:
        ws = ws or connect(settings)
        for name in sorted({s.cluster["name"] for s in specs}):
            first = next(s for s in specs if s.cluster["name"] == name)
            ensure_cluster(ws.ml_client, first.cluster, first.vm_size, max(s.nodes for s in specs))
    except Exception as e:  # noqa: BLE001 - e.g. not signed in: every job of the batch fails with it
        error = RuntimeError(f"nothing submitted: {type(e).__name__}: {str(e).strip()}")
        return [error] * len(specs)
    abort = aborts_on_failure() if abort_on_failure is None else abort_on_failure
    return Batch(ws, settings, abort).run(specs)


class Batch:
    """The jobs of one batch in flight: submitted and watched in threads, and cancelled together
    when the sweep aborts (a failed job when `abort_on_failure`, or Ctrl-C)."""

    def __init__(self, ws, settings: DictConfig, abort_on_failure: bool) -> None:
        self.ws, self.ml_client = ws, ws.ml_client
        self.settings, self.abort_on_failure = settings, abort_on_failure
        self.cancel_on_abort = bool(settings.get("cancel_on_abort", True))
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.running: set[str] = set()  # submitted and not known to have ended
        self.aborted: list[str] = []    # the job whose failure aborts the sweep

    def run(self, specs: list[JobSpec]) -> list:
        try:
            if self.settings.wait and self.settings.stream and len(specs) == 1:  # in this thread, so Ctrl-C reaches the stream
                return [self.one(specs[0], stream=True)]
            pool = ThreadPoolExecutor(max_workers=max(1, min(self.settings.max_parallel, len(specs))))
            try:
                futures = [pool.submit(self.one, spec) for spec in specs]
                outcomes = [self._result(spec, future) for spec, future in zip(specs, futures)]
                if self.aborted:
                    self.cancel_running(f"the sweep aborts after job {self.aborted[0]} failed")
                return outcomes
            finally:
                self.stop.set()  # on Ctrl-C the watchers end at their next poll; normally they are all done
                pool.shutdown(wait=False, cancel_futures=True)
        except (KeyboardInterrupt, Stopped):
            self.cancel_running("stopped watching")
            raise KeyboardInterrupt from None

    def _result(self, spec: JobSpec, future):
        try:
            return future.result()
        except Stopped:  # its watcher stopped because another job aborted the sweep
            if self.aborted and self.cancel_on_abort:
                return RuntimeError(f"Azure ML job {spec.name}: cancelled, the sweep aborted when job {self.aborted[0]} failed")
            return RuntimeError(f"Azure ML job {spec.name}: no longer watched, the sweep aborted")

    def one(self, spec: JobSpec, stream: bool = False):
        """Submit one job and, with `wait`, watch it to the end: its outcome."""
        if self.stop.is_set():  # the sweep aborted before this job's turn: it is not sent
            return RuntimeError(f"Azure ML job {spec.name}: not submitted, the sweep aborted")
        try:
            since = time.monotonic()
            submit_one(self.ml_client, spec)
            self._submitted(spec)
            if not self.settings.wait:
                return None
            outcome = wait_one(self.ws, spec, self.settings, stream, self.stop, since)
        except Stopped:
            raise
        except Exception as e:  # noqa: BLE001 - one job's failure must not lose the others' results
            outcome = RuntimeError(str(e).strip() if isinstance(e, QueueTimeout)
                                   else f"Azure ML job {spec.name}: {type(e).__name__}: {str(e).strip()}")
        self._ended(spec, outcome)
        return outcome

    def _submitted(self, spec: JobSpec) -> None:
        # stop is set before the running jobs are listed for cancelling: a job is either listed,
        # or sees stop here and was submitted too late for the list, and cancels itself.
        with self.lock:
            late = self.stop.is_set()
            if not late:
                self.running.add(spec.name)
        if late:
            if self.cancel_on_abort and cancel(self.ml_client, spec.name):
                print(f"cancelled Azure ML job {spec.name}: submitted as the sweep stopped", flush=True)
            raise Stopped(spec.name)

    def _ended(self, spec: JobSpec, outcome) -> None:
        with self.lock:
            self.running.discard(spec.name)
            if isinstance(outcome, BaseException) and self.abort_on_failure and not self.aborted and not self.stop.is_set():
                self.aborted.append(spec.name)
                self.stop.set()  # the other watchers end at their next poll; their jobs are cancelled in run()

    def cancel_running(self, why: str) -> None:
        with self.lock:
            names = sorted(self.running)
        if not names:
            print(f"{why}: no submitted job is still running", flush=True)
            return
        if not self.cancel_on_abort:
            print(f"{why}: submitted jobs keep running in Azure ML (Studio shows them)", flush=True)
            return
        cancelled = [n for n in names if cancel(self.ml_client, n)]
        print(f"{why}: cancelled Azure ML job(s) {', '.join(cancelled) or '(none)'}", flush=True)
