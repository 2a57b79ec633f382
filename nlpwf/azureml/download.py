"""What comes back of a finished Azure ML job: its small results, into its local job dir.

Only metrics.json, train_log.csv, the plots and the task's return value come back (model/ too
with `hydra.launcher.download_model`), from the job's named output `results`; checkpoints stay
in Azure. They are streamed blob by blob to disk (storage.fetch) into a temporary folder that is
always removed, then moved into <job dir>/azureml/outputs, with metrics.json also in the job dir
itself, where the sweep summary reads it. The emulator collects its results output the same way.

Why not the SDK's `ml_client.jobs.download(name, output_name="results")`: it brings the whole
output back (model/ included, hundreds of MB for a BERT-base), reads each blob whole into
memory, and builds its blob client without the launcher's retry settings. The output's
location comes from public calls (`jobs.get`, `datastores.get_default`) instead of the SDK's
private `_get_named_output_uri`.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from nlpwf.azureml import job as azjob
from nlpwf.azureml import payload, storage
from nlpwf.azureml.job import JobSpec
from nlpwf.results import files

RESULTS_OUTPUT = azjob.RESULTS_OUTPUT  # the named output with model/, metrics.json, train_log.csv, the plots
DEFAULT_OUTPUT = "default"             # the SDK's name of the default artifact store (./outputs, ./logs)
RESULTS_DIR = azjob.OUTPUTS_DIR        # <job dir>/azureml/outputs: what came back of a finished job
RESULT_FILES = (files.METRICS_FILE, files.TRAIN_LOG_FILE, payload.RETURN_FILE)
# Where Azure puts an output that declares no path, and a job's default artifact store (Azure ML's
# conventions, which the SDK's own lookup falls back on too).
OUTPUT_PATH = "azureml/{job}/{output}/"
ARTIFACT_STORE_URI = "azureml://datastores/workspaceartifactstore/paths/ExperimentRun/dcid.{job}/"


def wanted(relative: str, download_model: bool) -> bool:
    """Whether a blob of the results (path relative to the output's root) comes back:
    the small result files and plots at its top, and model/ only when asked."""
    parts = relative.split("/")
    if len(parts) == 1:
        return parts[0] in RESULT_FILES or parts[0].endswith(".png")
    return download_model and parts[0] == files.MODEL_DIR


def collect(downloaded: Path, job_dir: Path) -> None:
    """A finished job's downloaded results (the folder is moved) into <job dir>/azureml/outputs,
    and its metrics.json (nlpwf's tasks write one) into the job dir itself."""
    downloaded, job_dir = Path(downloaded), Path(job_dir)
    local = job_dir / azjob.AZURE_DIR / RESULTS_DIR
    if local.exists():
        shutil.rmtree(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(downloaded), str(local))
    metrics = files.read_metrics(local)
    if metrics is not None:
        files.write_json(job_dir / files.METRICS_FILE, metrics)


def task_return(job_dir: Path, who: str):
    """What the job's task returned, from its collected results."""
    path = Path(job_dir) / azjob.AZURE_DIR / RESULTS_DIR / payload.RETURN_FILE
    if not path.is_file():
        raise RuntimeError(f"{who} ended without its task's return value ({payload.RETURN_FILE} is not in its outputs)")
    return payload.read_return(path)


def output_uri(ws, name: str, output: str) -> str | None:
    """The azureml://datastores/... URI of a job's output: the path Azure reports (or the job
    declared), else where Azure puts it; None when the job has no such named output."""
    job = ws.ml_client.jobs.get(name)
    declared = (getattr(job, "outputs", None) or {}).get(output)
    path = getattr(declared, "path", None)
    if path and str(path).startswith("azureml://"):
        return str(path)
    if output == DEFAULT_OUTPUT:
        return ARTIFACT_STORE_URI.format(job=name)
    if declared is None:
        return None
    default = ws.ml_client.datastores.get_default().name
    return storage.datastore_uri(default, OUTPUT_PATH.format(job=name, output=output))


def download_results(ws, spec: JobSpec, settings: DictConfig) -> list[str]:
    """The job's results (see `wanted`) into <job dir>/azureml/outputs; what came back. A job
    without the `results` output (built before it existed) has them in ./outputs of its
    default artifact store."""
    download_model = bool(settings.get("download_model", False))
    (spec.job_dir / azjob.AZURE_DIR).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=spec.job_dir / azjob.AZURE_DIR))
    try:
        uri = output_uri(ws, spec.name, RESULTS_OUTPUT)
        if uri is not None:
            root = scratch / RESULTS_OUTPUT
            got = storage.fetch(ws, uri, root, lambda rel: wanted(rel, download_model))
        else:
            outputs = payload.REMOTE_RUN_DIR + "/"
            root = scratch / DEFAULT_OUTPUT / payload.REMOTE_RUN_DIR
            got = storage.fetch(ws, output_uri(ws, spec.name, DEFAULT_OUTPUT), scratch / DEFAULT_OUTPUT, lambda rel: (
                rel.startswith(outputs) and wanted(rel[len(outputs):], download_model)))
        root.mkdir(parents=True, exist_ok=True)
        collect(root, spec.job_dir)
        return got
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
