"""Checkpoints and `training.resume`: a run killed after a checkpoint and resumed ends where an
uninterrupted run with the same seed ends."""
from __future__ import annotations

import shutil

import pytest

from nlpwf.training import checkpoints

from conftest import RESUMABLE, complete_steps, kill_group, loss_trace, metrics, run_cli, start_cli, wait_for

pytestmark = pytest.mark.slow  # every test here trains end to end

# Resuming restores weights, optimizer, scheduler, RNG and the data order, so the rest of the
# run repeats the same arithmetic: on one process the results agree to float rounding.
TOLERANCE = 1e-6



def test_checkpoints_every_n_steps_and_each_epoch_end(uninterrupted):
    # save_total_limit=2 keeps the two newest: step 18 (every 3) and step 20 (the last epoch end).
    assert complete_steps(uninterrupted) == [18, 20]
    newest = uninterrupted / "checkpoints" / "checkpoint-20"
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (newest / name).is_file(), name


def test_killed_run_resumes_to_the_same_result(uninterrupted, tmp_path):
    job = tmp_path / "job"
    # resume=auto on a fresh job dir is a fresh start
    proc = start_cli(*RESUMABLE, "training.resume=auto", "logger=mlflow", f"hydra.run.dir={job}", log=tmp_path / "first.log")
    wait_for(lambda: complete_steps(job), proc)  # the first checkpoint (step 3) is complete
    kill_group(proc)
    assert "no complete checkpoint" in (tmp_path / "first.log").read_text()
    done = complete_steps(job)
    assert done and max(done) < 20 and not (job / "metrics.json").exists(), "the kill landed after training ended"

    resumed = run_cli(*RESUMABLE, "training.resume=auto", "logger=mlflow", f"hydra.run.dir={job}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {job / 'checkpoints' / f'checkpoint-{max(done)}'}" in resumed.stdout + resumed.stderr

    a, b = metrics(uninterrupted), metrics(job)
    for key in ("eval_loss", "eval_accuracy", "eval_f1"):
        assert abs(a[key] - b[key]) <= TOLERANCE, (key, a[key], b[key])
    whole, pieced = loss_trace(uninterrupted), loss_trace(job)
    assert sorted(whole) == sorted(pieced) == list(range(1, 21))  # the log history survives the kill
    assert max(abs(whole[s] - pieced[s]) for s in whole) <= TOLERANCE
    print(f"resumed from step {max(done)}: eval_loss differs by {abs(a['eval_loss'] - b['eval_loss']):.3g}, "
          f"loss trace by at most {max(abs(whole[s] - pieced[s]) for s in whole):.3g}, "
          f"parameters {'identical' if a['parameter_digests'] == b['parameter_digests'] else 'differ'}")

    # Both parts report into one MLflow run (its id is kept in the job dir), which ends FINISHED.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # no global state: later runs inherit env
    runs = client.search_runs([client.get_experiment_by_name("nlpwf").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert {m.step for m in history} == set(range(1, 21))


def test_half_written_newer_checkpoint_is_skipped_and_discarded(uninterrupted, tmp_path):
    """A newer checkpoint without its completion marker (as a kill mid-write leaves it) is never
    resumed from, although transformers' own get_last_checkpoint would pick it."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = tmp_path / "checkpoints"
    shutil.copytree(uninterrupted / "checkpoints" / "checkpoint-18", folder / "checkpoint-18")
    half = shutil.copytree(uninterrupted / "checkpoints" / "checkpoint-20", folder / "checkpoint-20")
    (half / checkpoints.MARKER).unlink()
    assert get_last_checkpoint(str(folder)).endswith("checkpoint-20")

    assert checkpoints.resume_point("auto", folder, is_main=True) == str(folder / "checkpoint-18")
    assert not half.exists()  # rank 0 clears it so the new run rewrites step 20 from scratch


def test_truncated_file_makes_a_checkpoint_incomplete(uninterrupted, tmp_path):
    ckpt = shutil.copytree(uninterrupted / "checkpoints" / "checkpoint-20", tmp_path / "checkpoint-20")
    assert checkpoints.is_complete(ckpt)
    with (ckpt / "optimizer.pt").open("r+b") as f:
        f.truncate(1000)
    assert not checkpoints.is_complete(ckpt)
