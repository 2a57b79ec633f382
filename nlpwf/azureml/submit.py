"""Send a batch of Azure ML jobs, and (with `wait`) watch them to the end and fetch results.

Jobs of a batch are submitted and watched in parallel threads: a sweep's points then run
on Azure at the same time instead of one after the other. What is submitted is each job's
job.yaml loaded back by the SDK, so a dry run shows exactly what would be sent.
"""
from __future__ import annotations

import logging
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import DictConfig

from nlpwf import outputs
from nlpwf.azureml import Submission, job as azjob, pending, workspace

log = logging.getLogger(__name__)

TERMINAL = {"Completed", "Failed", "Canceled", "NotResponding", "Paused"}
DOWNLOAD_DIR = "download"


def collect(remote_outputs: Path, job_dir: Path) -> dict | None:
    """A finished job's ./outputs into <job dir>/azureml/outputs, and its metrics.json into the
    job dir itself, where the sweep summary and sweepers read it. Returns the metrics."""
    remote_outputs, job_dir = Path(remote_outputs), Path(job_dir)
    if not remote_outputs.is_dir():
        return None
    local = job_dir / azjob.AZURE_DIR / "outputs"
    if local.exists():
        shutil.rmtree(local)
    shutil.copytree(remote_outputs, local)
    metrics = outputs.read_metrics(local)
    if metrics is not None:
        outputs.write_json(job_dir / outputs.METRICS_FILE, metrics)
    return metrics


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


def submit_one(ml_client, sub: Submission) -> str:
    created = ml_client.jobs.create_or_update(azjob.load(sub.job_yaml))
    # Printed, not only logged: the user needs these to find the job.
    print(f"submitted Azure ML job {created.name}: {created.studio_url}", flush=True)
    return created.name


def job_status(ml_client, name: str) -> str:
    status = ml_client.jobs.get(name).status
    return str(getattr(status, "value", status))  # the SDK answers with a str enum; messages want "Failed"


def error_text(ml_client, name: str, status: str) -> str:
    """Azure's own account of why a job ended badly."""
    if status != "Failed":
        return f"Azure ML job {name} ended {status}"
    try:  # on a finished job, stream() only fetches the run's details and raises with its error
        ml_client.jobs.stream(name)
    except Exception as e:  # noqa: BLE001 - the SDK's JobException carries Azure's error JSON
        return f"Azure ML job {name} failed: {e}"
    return f"Azure ML job {name} failed (Azure gave no error details; see its logs in Studio)"


class Stopped(Exception):
    """The user stopped watching (Ctrl-C); the job itself goes on in Azure ML."""


def wait_one(ml_client, sub: Submission, settings: DictConfig, stream: bool, stop: threading.Event):
    """Block until the job ends; its objective, or an exception describing the failure."""
    name = sub.name
    if stream:
        try:
            ml_client.jobs.stream(name)
        except Exception as e:  # noqa: BLE001 - a failure's details come from error_text below
            log.debug("stream of %s ended: %s", name, e)
    status = job_status(ml_client, name)
    if stream and status not in TERMINAL:  # the SDK ends its stream early only when interrupted
        raise Stopped(name)
    while status not in TERMINAL:
        if stop.wait(settings.poll_interval_s):
            raise Stopped(name)
        status = job_status(ml_client, name)
    if status != "Completed":
        return RuntimeError(error_text(ml_client, name, status))
    download = sub.job_dir / azjob.AZURE_DIR / DOWNLOAD_DIR
    ml_client.jobs.download(name, download_path=str(download))
    metrics = collect(download / "artifacts" / azjob.REMOTE_RUN_DIR, sub.job_dir)
    if metrics is None:
        return RuntimeError(f"Azure ML job {name} completed but its outputs have no {outputs.METRICS_FILE}")
    log.info("Azure ML job %s completed: %s=%s", name, sub.objective, metrics.get(sub.objective))
    return metrics.get(sub.objective)


def execute(subs: list[Submission], settings: DictConfig, ml_client=None) -> list:
    """Submit every job (and wait, if asked). One outcome per job: its objective (None when not
    waiting) or an exception. Clusters are checked once, before the first submission."""
    try:
        ml_client = ml_client or workspace.client(settings.workspace)
        for name in sorted({s.cluster["name"] for s in subs}):
            first = next(s for s in subs if s.cluster["name"] == name)
            ensure_cluster(ml_client, first.cluster, first.vm_size, max(s.nodes for s in subs))
    except Exception as e:  # noqa: BLE001 - e.g. not signed in: every job of the batch fails with it
        error = RuntimeError(f"nothing submitted: {type(e).__name__}: {str(e).strip()}")
        return [error] * len(subs)
    stop = threading.Event()

    def one(sub: Submission, stream: bool = False):
        try:
            submit_one(ml_client, sub)
            return wait_one(ml_client, sub, settings, stream, stop) if settings.wait else None
        except Stopped:
            raise
        except Exception as e:  # noqa: BLE001 - one job's failure must not lose the others' results
            return RuntimeError(f"Azure ML job {sub.name}: {type(e).__name__}: {str(e).strip()}")

    try:
        if settings.wait and settings.stream and len(subs) == 1:  # in this thread, so Ctrl-C reaches the stream
            return [one(subs[0], stream=True)]
        pool = ThreadPoolExecutor(max_workers=max(1, min(settings.max_parallel, len(subs))))
        try:
            futures = [pool.submit(one, sub) for sub in subs]
            return [f.result() for f in futures]
        finally:
            stop.set()  # on Ctrl-C the watchers end at their next poll; normally they are all done
            pool.shutdown(wait=False, cancel_futures=True)
    except (KeyboardInterrupt, Stopped):
        print("stopped watching: submitted jobs keep running in Azure ML (Studio shows them)", flush=True)
        raise KeyboardInterrupt from None


def submit_all(runs: list, settings: DictConfig, ml_client=None) -> None:
    """The launcher's step: submit the batch's Submissions and put each outcome in its JobReturn."""
    from hydra.core.utils import JobStatus

    todo = pending(runs)
    outcomes = execute([r._return_value for r in todo], settings, ml_client)
    for run, outcome in zip(todo, outcomes):
        if isinstance(outcome, BaseException):
            run.status = JobStatus.FAILED
        run._return_value = outcome
