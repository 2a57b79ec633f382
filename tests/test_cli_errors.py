"""Bad input: one line naming the problem and the fix, a non-zero exit, no traceback, and
nothing in the output dir touched."""
from __future__ import annotations

import time

import pytest

from conftest import TINY, assert_one_line_error, pairs, run_cli, write_glue


@pytest.fixture
def bad_dir(tmp_path):
    """A GLUE folder whose files a test breaks on purpose."""
    d = tmp_path / "bad"
    d.mkdir()
    write_glue(d / "train.tsv", pairs(8))
    write_glue(d / "dev.tsv", pairs(4))
    return d


def test_unknown_group_option_uses_hydras_message():
    proc = run_cli("model=no_such_model")
    assert proc.returncode != 0
    assert "Could not find 'model/no_such_model'" in proc.stderr and "minilm_l6" in proc.stderr


@pytest.mark.parametrize("override,fragments", [
    ("nodes=0", ["nodes=0", "at least one node"]),
    ("compute.processes_per_node=0", ["compute.processes_per_node=0", "use 1 or more"]),
    ("dataset.max_seq_length=256", ["max_seq_length=256", "limit of 128", "max_seq_length=128"]),
    ("+training.warmup_ratio=0.1", ["warmup_ratio", "warmup_steps=0.1"]),
    ("+model.config.hiden_dropout_prob=0", ["model.config.hiden_dropout_prob", "did you mean hidden_dropout_prob"]),
])
def test_config_errors(tmp_path, override, fragments):
    proc = run_cli(*TINY, override, f"hydra.run.dir={tmp_path / 'job'}")
    assert_one_line_error(proc, *fragments)


def test_data_dir_that_does_not_exist(tmp_path):
    proc = run_cli(*TINY, "dataset=mrpc", f"dataset.data_dir={tmp_path / 'nowhere'}")
    assert_one_line_error(proc, "is not a directory", "train.tsv and dev.tsv")


def test_wrong_column_count_names_file_and_line(bad_dir):
    with (bad_dir / "train.tsv").open("a", encoding="utf-8") as f:
        f.write("1\t7\t8\tno second sentence here\n")
    proc = run_cli(*TINY, "dataset=mrpc", f"dataset.data_dir={bad_dir}")
    assert_one_line_error(proc, f"{bad_dir / 'train.tsv'}:10", "expected 5 tab-separated columns, found 4")


def test_labels_not_0_or_1(bad_dir):
    write_glue(bad_dir / "dev.tsv", pairs(3) + [(5, 1, 2, "a", "b")])
    proc = run_cli(*TINY, "dataset=mrpc", f"dataset.data_dir={bad_dir}")
    assert_one_line_error(proc, "dev.tsv:5", "label '5' is not 0 or 1")


def test_empty_split(bad_dir):
    write_glue(bad_dir / "dev.tsv", [])
    proc = run_cli(*TINY, "dataset=mrpc", f"dataset.data_dir={bad_dir}")
    assert_one_line_error(proc, "dev.tsv has no rows")


@pytest.mark.parametrize("env", [{"HF_DATASETS_OFFLINE": "1"},
                                 {"HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": "", "TRANSFORMERS_OFFLINE": "",
                                  "HF_ENDPOINT": "http://127.0.0.1:9"}], ids=["offline-env", "no-route"])
def test_hub_unreachable_fails_fast_with_advice(env):
    start = time.monotonic()
    proc = run_cli(*TINY, "dataset=mrpc", env=env)
    assert_one_line_error(proc, "unreachable", "set dataset.data_dir=DIR", "dataset=paraphrase_sample")
    assert time.monotonic() - start < 60  # process start included; the check itself takes milliseconds


def test_failed_run_leaves_existing_outputs_alone(tmp_path, bad_dir):
    job = tmp_path / "job"
    (job / "model").mkdir(parents=True)
    (job / "metrics.json").write_text('{"eval_accuracy": 0.9}')
    (job / "model" / "config.json").write_text("{}")
    before = {p: p.read_bytes() for p in job.rglob("*") if p.is_file()}
    write_glue(bad_dir / "dev.tsv", [(2, 1, 2, "a", "b")])
    proc = run_cli(*TINY, "dataset=mrpc", f"dataset.data_dir={bad_dir}", f"hydra.run.dir={job}")
    assert_one_line_error(proc, "is not 0 or 1")
    assert {p: p.read_bytes() for p in job.rglob("*") if p.is_file() and p.parent.name != ".hydra" and p.suffix != ".log"} == before
    assert not [p for p in job.iterdir() if p.name.startswith(".model")]


def test_worker_error_stops_a_ddp_job(bad_dir, tmp_path):
    write_glue(bad_dir / "dev.tsv", [(1, 1, 2, "a", "b")] * 3 + [(0, 1, 2, "a")])
    proc = run_cli(*TINY, "compute.processes_per_node=2", "dataset=mrpc", f"dataset.data_dir={bad_dir}",
                   f"hydra.run.dir={tmp_path / 'job'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert "dev.tsv:5" in proc.stderr + proc.stdout
    assert not (tmp_path / "job" / "metrics.json").exists()
