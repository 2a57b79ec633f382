"""Send a batch of Azure ML jobs, and (with `wait`) watch them to the end and fetch results.

Jobs of a batch are submitted and watched in parallel threads: a sweep's points then run
on Azure at the same time instead of one after the other. What is submitted is each job's
job.yaml loaded back by the SDK, so a dry run shows exactly what would be sent. A finished
job's result is what its task returned on the nodes (payload.RETURN_FILE in its outputs).
"""
from __future__ import annotations

import logging
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import DictConfig

from nlpwf.azureml import job as azjob
from nlpwf.azureml import payload, workspace
from nlpwf.azureml.job import JobSpec
from nlpwf.results import files

log = logging.getLogger(__name__)

TERMINAL = {"Completed", "Failed", "Canceled", "NotResponding", "Paused"}
DOWNLOAD_DIR = "download"


def collect(remote_outputs: Path, job_dir: Path) -> None:
    """A finished job's ./outputs into <job dir>/azureml/outputs, and its metrics.json (nlpwf's
    tasks write one) into the job dir itself, where the sweep summary reads it."""
    remote_outputs, job_dir = Path(remote_outputs), Path(job_dir)
    if not remote_outputs.is_dir():
        return
    local = job_dir / azjob.AZURE_DIR / azjob.OUTPUTS_DIR
    if local.exists():
        shutil.rmtree(local)
    shutil.copytree(remote_outputs, local)
    metrics = files.read_metrics(local)
    if metrics is not None:
        files.write_json(job_dir / files.METRICS_FILE, metrics)


def task_return(job_dir: Path, who: str):
    """What the job's task returned, from its collected outputs."""
    path = Path(job_dir) / azjob.AZURE_DIR / azjob.OUTPUTS_DIR / payload.RETURN_FILE
    if not path.is_file():
        raise RuntimeError(f"{who} ended without its task's return value ({payload.RETURN_FILE} is not in its outputs)")
    return payload.read_return(path)


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


def wait_one(ml_client, spec: JobSpec, settings: DictConfig, stream: bool, stop: threading.Event):
    """Block until the job ends; its task's return value, or an exception describing the failure."""
    name = spec.name
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
    download = spec.job_dir / azjob.AZURE_DIR / DOWNLOAD_DIR
    ml_client.jobs.download(name, download_path=str(download))
    collect(download / "artifacts" / payload.REMOTE_RUN_DIR, spec.job_dir)
    value = task_return(spec.job_dir, f"Azure ML job {name}")
    log.info("Azure ML job %s completed: its task returned %r", name, value)
    return value


def execute(specs: list[JobSpec], settings: DictConfig, ml_client=None) -> list:
    """Submit every job (and wait, if asked). One outcome per job: its task's return value (None
    when not waiting) or an exception. Clusters are checked once, before the first submission."""
    try:
        ml_client = ml_client or workspace.client(settings.workspace)
        for name in sorted({s.cluster["name"] for s in specs}):
            first = next(s for s in specs if s.cluster["name"] == name)
            ensure_cluster(ml_client, first.cluster, first.vm_size, max(s.nodes for s in specs))
    except Exception as e:  # noqa: BLE001 - e.g. not signed in: every job of the batch fails with it
        error = RuntimeError(f"nothing submitted: {type(e).__name__}: {str(e).strip()}")
        return [error] * len(specs)
    stop = threading.Event()

    def one(spec: JobSpec, stream: bool = False):
        try:
            submit_one(ml_client, spec)
            return wait_one(ml_client, spec, settings, stream, stop) if settings.wait else None
        except Stopped:
            raise
        except Exception as e:  # noqa: BLE001 - one job's failure must not lose the others' results
            return RuntimeError(f"Azure ML job {spec.name}: {type(e).__name__}: {str(e).strip()}")

    try:
        if settings.wait and settings.stream and len(specs) == 1:  # in this thread, so Ctrl-C reaches the stream
            return [one(specs[0], stream=True)]
        pool = ThreadPoolExecutor(max_workers=max(1, min(settings.max_parallel, len(specs))))
        try:
            futures = [pool.submit(one, spec) for spec in specs]
            return [f.result() for f in futures]
        finally:
            stop.set()  # on Ctrl-C the watchers end at their next poll; normally they are all done
            pool.shutdown(wait=False, cancel_futures=True)
    except (KeyboardInterrupt, Stopped):
        print("stopped watching: submitted jobs keep running in Azure ML (Studio shows them)", flush=True)
        raise KeyboardInterrupt from None
