"""Azure ML's HTTP inference server (`azureml-inference-server-http`, the `azmlinfsrv` command) as a
child process: started with nlpwf's scoring script on 127.0.0.1, waited on until ready, stopped.

The server is the one a managed online deployment runs: gunicorn with sync workers (WORKER_COUNT,
1 by default) serving a Flask app with POST /score, GET / ("Healthy": the liveness and readiness
route), GET /swagger.json. Each worker runs the scoring script's init() before it takes its first
connection, so GET / answers only once the model is loaded; a failing init() makes gunicorn stop
with exit code 3. On SIGTERM gunicorn closes its listening socket, lets each worker finish the
request it is on (up to its graceful timeout, 30 s), and exits 0.

It lives in its own environment: it pins opentelemetry-sdk==1.33.0 and pydantic~=2.12, which the
dev environment's wandb and azure-monitor-opentelemetry have outgrown. That environment is built
from docker/inference/requirements.lock, the packages of the endpoint's image, so a package the
image lacks is missing here too (`python_for_server` finds it).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from nlpwf import PROJECT_ROOT
from nlpwf.errors import JobFailed, UserError

SCORING_SCRIPT = Path(__file__).with_name("score.py")
SERVE_VENV = PROJECT_ROOT / ".venv-serve"
PYTHON_ENV = "NLPWF_SERVE_PYTHON"
MAKE_VENV = "bash docker/inference/venv.sh"
HOST = "127.0.0.1"
# `azmlinfsrv` binds 0.0.0.0 (inside Azure's container that is the point) and has no option for the
# host. Here the model should not be on the network: run the same entry with that one constant changed.
LAUNCH = ("from azureml_inference_server_http import amlserver; "
          f"amlserver.DEFAULT_HOST = {HOST!r}; amlserver.run()")
GRACEFUL_S = 30  # gunicorn's default graceful timeout: a worker's last request gets this long


def python_for_server(configured: str | None = None) -> str:
    """The interpreter that has the inference server: stage.server_python, $NLPWF_SERVE_PYTHON,
    the project's .venv-serve, or this one if it has the server."""
    for candidate in (configured, os.environ.get(PYTHON_ENV), SERVE_VENV / "bin" / "python"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
        if candidate and candidate == configured:
            raise UserError(f"stage.server_python={configured} does not exist: point it at the python of the "
                            f"inference server's environment (made by `{MAKE_VENV}`)")
    probe = subprocess.run([sys.executable, "-c", "import azureml_inference_server_http"], capture_output=True)
    if probe.returncode == 0:
        return sys.executable
    raise UserError(f"Azure ML's inference server is not installed (no {SERVE_VENV.name} beside the project): "
                    f"run `{MAKE_VENV}` (its own environment: it pins opentelemetry and pydantic versions "
                    f"the dev environment cannot hold), or set {PYTHON_ENV}=PYTHON of an environment that has it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, lines: int = 12) -> str:
        """The log's error lines (an exception's last line names the cause), else its last lines."""
        text = self.log.read_text(errors="replace").splitlines() if self.log.is_file() else []
        errors = [line for line in text if re.search(r"(Error|Exception)\b.*:|\bE \[", line)]
        return "\n".join((errors or text)[-lines:])


def start(model_dir: Path, port: int, env: dict[str, str], log: Path, app_root: Path = PROJECT_ROOT,
          entry_script: Path = SCORING_SCRIPT, python: str | None = None, workers: int = 1, inherit_env: bool = True) -> Server:
    """Start the server on HOST:port (0: a free one) with `entry_script`, AML_APP_ROOT=`app_root` (put on
    sys.path by the server, as Azure does with the deployment's code folder) and AZUREML_MODEL_DIR=`model_dir`.
    `env`: the scoring script's variables; with inherit_env=False they are the whole environment."""
    port = port or free_port()
    command = [python or python_for_server(), "-c", LAUNCH, "--entry_script", str(entry_script),
               "--model_dir", str(model_dir), "--port", str(port), "--worker_count", str(workers)]
    base = dict(os.environ) if inherit_env else {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    # gunicorn 27 opens a control socket at one fixed path per user (~/.gunicorn/gunicorn.ctl): two servers
    # here (tests, the benchmark's fp32 and INT8) would take it from each other. Azure runs one per container.
    # PYTHONUNBUFFERED as the inference image sets it: the log keeps the order things happened in.
    full_env = {**base, **env, "AML_APP_ROOT": str(app_root), "GUNICORN_CMD_ARGS": "--no-control-socket",
                "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=app_root, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return Server(process, port, log)


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(url: str, body: bytes, timeout: float = 120.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(server: Server, timeout: float) -> None:
    """Until GET / answers 200 (init() done in a worker); JobFailed if the server ends first or the
    time runs out (then it is stopped), with the end of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise JobFailed(f"the inference server stopped (exit code {server.process.returncode}) before it was ready; "
                            f"its log ({server.log}) ends:\n{server.log_tail()}")
        try:
            if get(server.url + "/", timeout=min(5.0, max(0.5, deadline - time.monotonic())))[0] == 200:
                return
        except OSError:
            pass  # not listening yet, or still loading the model
        time.sleep(0.2)
    stop(server)
    raise JobFailed(f"the inference server was not ready within {timeout:.0f} s (stage.ready_timeout_s); "
                    f"its log ({server.log}) ends:\n{server.log_tail()}")


def stop(server: Server, sig: int = signal.SIGTERM, timeout: float = GRACEFUL_S + 15) -> int:
    """SIGTERM to gunicorn's master (it drains its workers), then wait; SIGKILL to the whole group if
    it outlives `timeout`. Returns its exit code."""
    if server.process.poll() is None:
        try:
            server.process.send_signal(sig)
            return server.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
    return server.process.wait()
