"""The tests' shared helpers and fixtures, all here: run the CLI as a user would (in the foreground or
in the background to be killed), compose configs, write small GLUE folders, save a tiny model,
and read what a job left behind."""
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

# Two xdist workers share the cores, and so do the processes they start: a waiting OpenMP thread
# should sleep, not spin. Spinning, two quickstart trainings side by side on 2 cores took 344 s
# each against 47 s passive (37 s alone). Set before torch loads its OpenMP runtime, which reads
# it once; inherited by every process a test starts. A value the developer set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from nlpwf import CONF_DIR, PROJECT_ROOT, models
from nlpwf.training import checkpoints

SHARED_MRPC = PROJECT_ROOT.parent / "shared" / "data" / "mrpc"

# Tests never touch the network: fail fast instead of waiting on the Hub.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
os.environ.update(OFFLINE_ENV)

# A few seconds of training: tiny random BERT, a slice of the shipped sample, no progress bars.
TINY = ["model=tiny_bert", "dataset.max_train_samples=64", "dataset.max_eval_samples=32",
        "training.num_train_epochs=1", "training.disable_tqdm=true", "training.logging_steps=1"]


# Where CLI runs start unless a test says otherwise: the running test's own temp dir, so a job
# dir left at Hydra's default (outputs/, multirun/ under the working dir) never lands in the
# repository. Set by the autouse fixtures below.
_WORK_DIRS: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def _session_work_dir(tmp_path_factory):
    _WORK_DIRS.append(tmp_path_factory.mktemp("cli"))  # for session-scoped fixtures
    # datasets' Arrow cache (every data source is memory-mapped from it): under the session's
    # temp dir, for this process (already imported datasets) and every process a test starts.
    cache = tmp_path_factory.mktemp("hf_datasets")
    os.environ["HF_DATASETS_CACHE"] = str(cache)
    import datasets

    datasets.config.HF_DATASETS_CACHE = cache
    yield


@pytest.fixture(autouse=True)
def _test_work_dir(tmp_path):
    _WORK_DIRS.append(tmp_path)
    yield
    _WORK_DIRS.pop()


def work_dir() -> Path:
    return _WORK_DIRS[-1]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m nlpwf ARGS` in a fresh process, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "nlpwf", *args], cwd=cwd or work_dir(), capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **OFFLINE_ENV, **(env or {})},
    )


def compose(*overrides: str, return_hydra_config: bool = False):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


GLUE_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"


def write_glue(path: Path, rows: list[tuple], bom: bool = True, header: str = GLUE_HEADER) -> Path:
    lines = [header] + ["\t".join(str(c) for c in r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8-sig" if bom else "utf-8")
    return path


def pairs(n: int, start: int = 0) -> list[tuple]:
    return [(i % 2, 1000 + i, 2000 + i, f"The cat sat on mat number {i} .", f"A \" quoted \" cat sat on mat {i} .")
            for i in range(start, start + n)]


@pytest.fixture
def glue_dir(tmp_path: Path) -> Path:
    d = tmp_path / "glue"
    d.mkdir()
    write_glue(d / "train.tsv", pairs(48))
    write_glue(d / "dev.tsv", pairs(16, start=100))
    return d


# ---- killing and resuming runs (reliability tests) -------------------------------------------

# A tiny run long enough to be killed in the middle: 10 steps per epoch, 2 epochs,
# a checkpoint every 3 steps and at each epoch end.
RESUMABLE = [*TINY, "dataset.max_train_samples=160", "training.num_train_epochs=2",
             "training.save_steps=3", "training.save_total_limit=2"]


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The user-error contract: exit 2, no traceback, exactly one `nlpwf: error:` line holding each fragment."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nlpwf: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


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


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> Path:
    """One RESUMABLE run start to end: the reference for resume and determinism tests."""
    job = tmp_path_factory.mktemp("whole") / "job"
    proc = run_cli(*RESUMABLE, f"hydra.run.dir={job}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return job


# ---- a tiny saved model (serving stage tests) -----------------------------------------------

def save_tiny_model(folder: Path, seed: int = 0, **head) -> Path:
    """A tiny random BERT saved as training saves it; `head`: a task's head (data.tasks.Task.model_config)."""
    # BERT's default init (std 0.02) gives a random model near-constant logits; a wider one
    # makes its outputs, and so its labels, depend on the input as a trained model's do.
    cfg = compose("model=tiny_bert", "+model.config.initializer_range=0.5").model
    torch.manual_seed(seed)
    model = models.load_model(cfg, **head)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    models.load_tokenizer(cfg).save_pretrained(str(folder))
    return folder


def sentence_pairs(n: int, start: int = 0) -> list[tuple[str, str]]:
    words = ["cat", "dog", "market", "shares", "rose", "fell", "court", "ruled", "river", "city"]
    return [(f"The {words[i % 10]} and the {words[(i * 3) % 10]} met on day {i} .",
             f"A {words[(i * 7) % 10]} saw {words[(i + 1) % 10]} {i % 5} times .") for i in range(start, start + n)]
