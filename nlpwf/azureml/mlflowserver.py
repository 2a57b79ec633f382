"""The MLflow tracking server of emulated Azure ML jobs, standing in for the workspace's.

Azure ML creates an MLflow run for every job in its workspace's tracking server and tells the
job's processes about it through MLFLOW_TRACKING_URI, MLFLOW_RUN_ID, MLFLOW_EXPERIMENT_ID and
MLFLOW_EXPERIMENT_NAME (the names azureml-mlflow 1.62 reads; Azure also sets a token,
MLFLOW_TRACKING_TOKEN, which a local server has no use for). When the job ends Azure marks the
run finished or failed.

The emulator does the same against MLflow's own tracking server (`mlflow server`), started here
once per launcher process on a port held for it (runtime.network): a workspace's server serves
all its jobs, and it starts in seconds, not instantly. mlflow-skinny ships the server; its
default uvicorn app needs the full `mlflow` package, whose pins would downgrade pandas and
pyarrow here, so it runs MLflow's Flask app under gunicorn (`--gunicorn-opts`), which needs
flask, flask-cors and gunicorn only (setup.cfg's dev extra). Its store (mlflow.db, and the
artifacts/ it serves to the nodes as Azure's artifact store does) is
`hydra.launcher.emulate_tracking_dir` when set, kept afterwards for `mlflow ui`; else a
temporary folder, removed when the launcher process ends (a sweep dir is no place for it: the
server outlives each sweep of the process). Without those packages, emulated jobs run with no
MLflow variables, and the launcher says so.
"""
from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from nlpwf.runtime import network

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0
NEEDS = ("mlflow", "flask", "flask_cors", "gunicorn")


@dataclass
class Server:
    uri: str
    store: Path
    process: subprocess.Popen
    temporary: bool = False


_server: Server | None = None


def _start(store: Path) -> Server:
    store.mkdir(parents=True, exist_ok=True)
    port = network.free_port("127.0.0.1")
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts"),
               "--gunicorn-opts", "--log-level warning"]
    with open(store / "server.log", "ab") as out:
        # No job runner: it needs packages the server does not (huey), and Azure's jobs run none.
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    server = Server(f"http://127.0.0.1:{port}", store, process)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _healthy(server.uri):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            tail = (store / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the emulator's MLflow tracking server did not start ({store / 'server.log'}):\n{tail}")
        time.sleep(0.5)
    log.info("MLflow tracking server of the emulated Azure ML workspace: %s, store %s", server.uri, store)
    return server


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def server(store: str | Path | None) -> Server | None:
    """The running server, started at the first call or when asked for another `store` (None: a
    temporary one); None when MLflow's server cannot run here."""
    global _server
    wanted = Path(store).expanduser().resolve() if store else None
    if _server is not None and (_server.process.poll() is not None or (wanted and wanted != _server.store)):
        stop()
    if _server is None:
        missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
        if missing:
            log.warning("emulated Azure ML jobs get no MLflow run (no %s installed: pip install -e '.[dev]')", ", ".join(missing))
            return None
        _server = _start(wanted or Path(tempfile.mkdtemp(prefix="nlpwf-emulated-mlflow-")))
        _server.temporary = wanted is None
    return _server


def job_run(srv: Server, experiment: str, job_name: str, display_name: str | None) -> dict[str, str]:
    """The job's run, created as Azure creates it; the variables that tell the job's processes."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=srv.uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=display_name or job_name, tags={"azureml.job_name": job_name})
    return {"MLFLOW_TRACKING_URI": srv.uri, "MLFLOW_RUN_ID": run.info.run_id,
            "MLFLOW_EXPERIMENT_ID": experiment_id, "MLFLOW_EXPERIMENT_NAME": experiment}


def end_run(srv: Server, run_id: str, succeeded: bool) -> None:
    """The run's status once the job has ended, as Azure sets it."""
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=srv.uri).set_terminated(run_id, "FINISHED" if succeeded else "FAILED")
    except Exception as e:  # noqa: BLE001 - the job's own outcome matters more than its run's status
        log.warning("could not mark the job's MLflow run %s %s: %s", run_id, "finished" if succeeded else "failed", e)


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stop() -> None:
    global _server
    if _server is not None:
        stop_process(_server.process)
        if _server.temporary:
            shutil.rmtree(_server.store, ignore_errors=True)
        _server = None


atexit.register(stop)
