"""Shared test helpers: run the CLI as a user would, compose configs, write small GLUE folders."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nlpwf import CONF_DIR, PROJECT_ROOT

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
