"""Helpers for the checkpoint and fault tests: start real runs in the background, wait for a
checkpoint, kill, read the outputs."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nlpwf.training import checkpoints

from conftest import OFFLINE_ENV, TINY, run_cli, work_dir

# A tiny run long enough to be killed in the middle: 10 steps per epoch, 2 epochs,
# a checkpoint every 3 steps and at each epoch end.
RESUMABLE = [*TINY, "dataset.max_train_samples=160", "training.num_train_epochs=2",
             "training.save_steps=3", "training.save_total_limit=2"]


def start_cli(*args: str, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    """`python -m nlpwf ARGS` in the background, in its own process group, output to `log`."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "nlpwf", *args], cwd=work_dir(), stdout=out, stderr=subprocess.STDOUT,
        env={**os.environ, **OFFLINE_ENV, **(env or {})}, start_new_session=True,
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120, poll: float = 0.01):
    """Poll until `predicate()` is truthy; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before the awaited moment")
        time.sleep(poll)
    raise AssertionError("timed out waiting")


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def complete_steps(job: Path) -> list[int]:
    return [checkpoints.step_of(p) for p in checkpoints.complete_checkpoints(job / checkpoints.CHECKPOINT_DIR)]


def loss_trace(job: Path) -> dict[int, float]:
    """Training loss per logged step, from the job's train_log.csv."""
    with (job / "train_log.csv").open() as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")}


def metrics(job: Path) -> dict:
    return json.loads((job / "metrics.json").read_text())


_REFERENCE: dict[str, Path] = {}


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> Path:
    """One RESUMABLE run start to end: the reference for resume and determinism tests. Each test
    module that imports this fixture gets its own instance, so the run is cached here."""
    if "job" not in _REFERENCE:
        job = tmp_path_factory.mktemp("whole") / "job"
        proc = run_cli(*RESUMABLE, f"hydra.run.dir={job}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        _REFERENCE["job"] = job
    return _REFERENCE["job"]
