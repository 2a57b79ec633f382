"""stage=serve: a saved model over HTTP on this machine, with Azure ML's inference server and
nlpwf's scoring script (inference/score.py), as a managed online deployment serves it.

    python -m nlpwf stage=serve stage.model_path=outputs/DATE/TIME/model [stage.port=5001]
    curl -s localhost:5001/score -d '{"inputs": [{"text": "...", "text_pair": "..."}]}'

The server runs as a child process on 127.0.0.1 (inference/server.py says why it is its own
environment) and this job waits for it. The job logs one line once the model answers: the URL,
the model, its precision and INT8 backend. SIGTERM (or Ctrl-C) is passed on to the server, which
finishes the requests in flight, and the job then ends with exit code 0; a server that dies on its
own fails the job with the end of its log. server.log in the job dir holds the server's output.
"""
from __future__ import annotations

import logging
import signal
from pathlib import Path

from omegaconf import DictConfig

from nlpwf import models
from nlpwf.errors import JobFailed, UserError
from nlpwf.inference import scoring, server
from nlpwf.runtime import isa

log = logging.getLogger(__name__)

LOG_FILE = "server.log"


def settings(cfg: DictConfig) -> scoring.Settings:
    stage = cfg.stage
    return scoring.Settings(max_batch=stage.max_batch, max_length=stage.max_length, too_long=stage.too_long,
                            precision=cfg.precision.name, compile=stage.compile, threads=stage.threads,
                            workers=stage.workers).check()


def check_port(port) -> int:
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise UserError(f"stage.port={port}: give a port from 1 to 65535 (0: any free one)")
    return port


def run(cfg: DictConfig, job_dir: Path) -> dict:
    stage = cfg.stage
    chosen = settings(cfg)
    port = check_port(stage.port)
    folder = models.saved_model_dir(stage.model_path, "serve").resolve()
    about = scoring.describe(folder)
    precision = "int8" if about["precision"] == "int8" else isa.resolve(chosen.precision)
    python = server.python_for_server(stage.get("server_python"))
    started = server.start(folder, port, chosen.env(), Path(job_dir) / LOG_FILE, python=python, workers=chosen.workers)
    stopping = []

    def on_signal(signum, frame):  # the server drains its requests; this job then returns
        stopping.append(signum)
        if started.process.poll() is None:
            started.process.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            server.wait_ready(started, stage.ready_timeout_s)
        except JobFailed:
            if not stopping:
                raise
        else:
            log.info("serving %s/score  (model %s, precision %s, backend %s; GET / answers liveness and readiness; "
                     "log in %s)", started.url, folder, precision, about["backend"], started.log)
        code = started.process.wait()
    finally:
        if started.process.poll() is None:
            server.stop(started)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not stopping:
        raise JobFailed(f"the inference server stopped on its own (exit code {code}); its log ({started.log}) ends:\n"
                        f"{started.log_tail()}")
    log.info("inference server stopped (exit code %d): every request it had accepted was answered", code)
    if code != 0:
        raise JobFailed(f"the inference server exited with code {code} while stopping; see {started.log}")
    return {"url": started.url, "model": str(folder), **about, "precision": precision, "server_exit_code": code}
