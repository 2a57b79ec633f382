"""Bad input: one line naming the problem and the fix, a non-zero exit, no traceback, and
nothing in the output dir touched.

Each message is checked in-process, on a composed config through the train stage's preflight
(what `python -m nlpwf` runs before any model loads). A few cases go through the CLI, a
process start each, for the contract itself: exit code 2, exactly one `nlpwf: error:` line,
no traceback, nothing written, and a worker's error stopping a job of two processes."""
from __future__ import annotations

import time

import pytest

from nlpwf import stages
from nlpwf.errors import UserError
from nlpwf.stages import train
from nlpwf.training.trainer import training_arguments

from conftest import TINY, assert_one_line_error, compose, pairs, run_cli, write_glue


@pytest.fixture
def bad_dir(tmp_path):
    """A GLUE folder whose files a test breaks on purpose."""
    d = tmp_path / "bad"
    d.mkdir()
    write_glue(d / "train.tsv", pairs(8))
    write_glue(d / "dev.tsv", pairs(4))
    return d


def preflight_error(*overrides: str) -> str:
    """The one-line message the train stage refuses this config with, before any model loads."""
    with pytest.raises(UserError) as e:
        train.preflight(compose(*TINY, *overrides))
    message = str(e.value)
    assert "\n" not in message and e.value.exit_code == 2
    return message


def test_unknown_group_option_uses_hydras_message():
    proc = run_cli("model=no_such_model")
    assert proc.returncode != 0
    assert "Could not find 'model/no_such_model'" in proc.stderr and "minilm_l6" in proc.stderr


@pytest.mark.parametrize("override,fragments", [
    ("nodes=0", ["nodes=0", "at least one node"]),
    ("compute.processes_per_node=0", ["compute.processes_per_node=0", "use 1 or more"]),
    ("dataset.max_seq_length=256", ["max_seq_length=256", "limit of 128", "max_seq_length=128"]),
    ("+model.config.hiden_dropout_prob=0", ["model.config.hiden_dropout_prob", "did you mean hidden_dropout_prob"]),
])
def test_config_errors(override, fragments):
    message = preflight_error(override)
    for fragment in fragments:
        assert fragment in message, message


def test_a_removed_training_argument_names_its_replacement(tmp_path):
    # Checked where TrainingArguments are built, after the preflight: on the stage's own path.
    with pytest.raises(UserError) as e:
        training_arguments(compose(*TINY, "+training.warmup_ratio=0.1"), tmp_path, [], "fp32")
    assert "\n" not in str(e.value) and "warmup_ratio" in str(e.value) and "warmup_steps=0.1" in str(e.value)


def test_data_dir_that_does_not_exist(tmp_path):
    message = preflight_error("dataset=mrpc", f"dataset.data_dir={tmp_path / 'nowhere'}")
    assert "is not a directory" in message and "train.tsv and dev.tsv" in message


def test_wrong_column_count_names_file_and_line(bad_dir):
    with (bad_dir / "train.tsv").open("a", encoding="utf-8") as f:
        f.write("1\t7\t8\tno second sentence here\n")
    message = preflight_error("dataset=mrpc", f"dataset.data_dir={bad_dir}")
    assert f"{bad_dir / 'train.tsv'}:10" in message and "expected 5 tab-separated columns, found 4" in message


def test_labels_not_0_or_1(bad_dir):
    write_glue(bad_dir / "dev.tsv", pairs(3) + [(5, 1, 2, "a", "b")])
    message = preflight_error("dataset=mrpc", f"dataset.data_dir={bad_dir}")
    assert "dev.tsv:5" in message and "label '5' is not 0 or 1" in message


def test_empty_split(bad_dir):
    write_glue(bad_dir / "dev.tsv", [])
    assert "dev.tsv has no rows" in preflight_error("dataset=mrpc", f"dataset.data_dir={bad_dir}")


# ---- through the CLI: the contract (a process start each) ---------------------------------------

def test_a_config_error_through_the_cli(tmp_path):
    proc = run_cli(*TINY, "nodes=0", f"hydra.run.dir={tmp_path / 'job'}")
    assert_one_line_error(proc, "nodes=0", "at least one node")


# With the offline variables set, in-process: tests/test_data.py::test_hub_offline_fails_fast_with_advice.
@pytest.mark.slow  # a process start: the Hub's variables are read at import
def test_hub_unreachable_fails_fast_with_advice():
    start = time.monotonic()
    proc = run_cli(*TINY, "dataset=mrpc", env={"HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": "", "TRANSFORMERS_OFFLINE": "",
                                               "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert_one_line_error(proc, "unreachable", "set dataset.data_dir=DIR", "dataset=paraphrase_sample")
    assert time.monotonic() - start < 60  # process start included; the check itself takes milliseconds


def test_failed_run_leaves_existing_outputs_alone(tmp_path, bad_dir):
    job = tmp_path / "job"
    (job / "model").mkdir(parents=True)
    (job / "metrics.json").write_text('{"eval_accuracy": 0.9}')
    (job / "model" / "config.json").write_text("{}")
    before = {p: p.read_bytes() for p in job.rglob("*") if p.is_file()}
    write_glue(bad_dir / "dev.tsv", [(2, 1, 2, "a", "b")])
    with pytest.raises(UserError, match="is not 0 or 1"):
        stages.run(compose(*TINY, "dataset=mrpc", f"dataset.data_dir={bad_dir}"), job)  # what the CLI runs in the job dir
    assert {p: p.read_bytes() for p in job.rglob("*") if p.is_file()} == before
    assert not [p for p in job.iterdir() if p.name.startswith(".model")]


@pytest.mark.slow  # a job of two processes
def test_worker_error_stops_a_ddp_job(bad_dir, tmp_path):
    write_glue(bad_dir / "dev.tsv", [(1, 1, 2, "a", "b")] * 3 + [(0, 1, 2, "a")])
    proc = run_cli(*TINY, "compute.processes_per_node=2", "dataset=mrpc", f"dataset.data_dir={bad_dir}",
                   f"hydra.run.dir={tmp_path / 'job'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert "dev.tsv:5" in proc.stderr + proc.stdout
    assert not (tmp_path / "job" / "metrics.json").exists()
