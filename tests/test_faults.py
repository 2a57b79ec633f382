"""Faults with real processes: a rank killed or stalled mid-training, a run killed while it
writes a checkpoint, and determinism of the loss trace."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from nlpwf.errors import PeerLost
from nlpwf.runtime import contract, jobfile, workers
from nlpwf.training import checkpoints

from conftest import OFFLINE_ENV, RESUMABLE, complete_steps, compose, kill_group, loss_trace, metrics, run_cli, start_cli, wait_for

pytestmark = pytest.mark.slow  # every test here trains end to end


DDP = [*RESUMABLE, "compute.processes_per_node=2"]


def _ranks(parent: subprocess.Popen) -> dict[int, psutil.Process]:
    """The worker processes of a local multi-process job, by rank (read from their env contract)."""
    found = {}
    for p in psutil.Process(parent.pid).children(recursive=True):
        env = p.environ()
        if "RANK" in env:
            found[int(env["RANK"])] = p
    return found


def _assert_loadable(ckpt, ranks: int = 2) -> None:
    assert checkpoints.is_complete(ckpt)
    assert load_file(str(ckpt / "model.safetensors"))
    assert torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    rng = ["rng_state.pth"] if ranks == 1 else [f"rng_state_{r}.pth" for r in range(ranks)]
    assert all(torch.load(ckpt / name, weights_only=False)["cpu"] is not None for name in rng)


def test_killing_one_rank_stops_every_rank_and_the_job_resumes(tmp_path):
    job = tmp_path / "job"
    proc = start_cli(*DDP, f"hydra.run.dir={job}", log=tmp_path / "killed.log")
    wait_for(lambda: complete_steps(job), proc, timeout=300)
    ranks = _ranks(proc)
    assert sorted(ranks) == [0, 1]
    killed_at = time.monotonic()
    ranks[1].send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    elapsed = time.monotonic() - killed_at
    out = (tmp_path / "killed.log").read_text()

    assert proc.returncode != 0 and elapsed < 30, (proc.returncode, elapsed)
    assert not any(psutil.pid_exists(p.pid) for p in ranks.values())
    assert "rank 1 was killed by SIGKILL" in out  # the launcher names the lost rank
    assert "nlpwf: error: a worker process was killed by SIGKILL" in out and "Traceback" not in out
    newest = checkpoints.newest_complete(job / "checkpoints")
    assert f"newest complete checkpoint: {newest}" in out
    _assert_loadable(newest)
    print(f"all ranks exited {elapsed:.1f} s after rank 1 was killed")

    resumed = run_cli(*DDP, "training.resume=auto", f"hydra.run.dir={job}")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resuming from {newest}" in resumed.stdout
    m = metrics(job)
    assert m["world_size"] == 2 and m["epoch"] == 2.0 and len(set(m["parameter_digests"])) == 1


def test_a_stalled_rank_makes_its_peer_exit_after_the_group_timeout(tmp_path):
    """Without nlpwf's launcher (torchrun, Azure ML start the ranks), a surviving rank must not
    wait forever on a rank that stalled: it gives up after training.ddp_timeout."""
    timeout_s = 10
    job = tmp_path / "job"
    job.mkdir()
    cfg = compose(*RESUMABLE, f"training.ddp_timeout={timeout_s}")
    command = jobfile.worker_command(jobfile.write_job_config(cfg, job / jobfile.JOB_CONFIG), job)
    port = workers.free_port()
    procs = [subprocess.Popen(command, cwd=tmp_path, stdout=open(tmp_path / f"rank{r}.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, **OFFLINE_ENV, **contract.contract_env(r, r, 0, 2, 2, port, 1)})
             for r in range(2)]
    try:
        wait_for(lambda: complete_steps(job), procs[0], timeout=300)
        procs[1].send_signal(signal.SIGSTOP)
        stalled_at = time.monotonic()
        procs[0].wait(timeout=timeout_s + 60)
        elapsed = time.monotonic() - stalled_at
    finally:
        for p in procs:
            kill_group(p)
    out = (tmp_path / "rank0.log").read_text()
    assert procs[0].returncode == PeerLost.exit_code, out[-2000:]
    assert timeout_s - 1 <= elapsed < timeout_s + 30, elapsed
    assert "nlpwf: error: rank 0 timed out waiting for rank 1" in out and "Traceback" not in out
    print(f"rank 0 exited {elapsed:.1f} s after rank 1 stalled (ddp_timeout {timeout_s} s)")


def test_kill_during_a_checkpoint_write_falls_back_to_the_previous_one(tmp_path):
    # A wider model, so that writing a checkpoint (about 50 MB) takes long enough to be caught.
    wide = [*RESUMABLE, "training.save_steps=2", "model.config.hidden_size=128", "model.config.intermediate_size=256"]
    job = tmp_path / "job"
    folder = job / "checkpoints"
    proc = start_cli(*wide, f"hydra.run.dir={job}", log=tmp_path / "killed.log")
    wait_for(lambda: complete_steps(job), proc, timeout=300)

    def writing():
        done = complete_steps(job)
        partial = [p for p in checkpoints.all_checkpoints(folder) if checkpoints.step_of(p) > max(done)
                   and not checkpoints.is_complete(p)]
        return partial[-1] if partial else None

    half = wait_for(writing, proc, poll=0.001)
    kill_group(proc)
    previous = checkpoints.newest_complete(folder)
    assert half.is_dir() and not checkpoints.is_complete(half), "the kill landed after the write finished"
    assert checkpoints.step_of(previous) < checkpoints.step_of(half)
    # What `training.resume=auto` does first (the resume itself is tested in test_checkpoint_resume.py)
    assert checkpoints.resume_point("auto", folder, is_main=True) == str(previous)
    assert not half.exists()
    _assert_loadable(previous, ranks=1)


def test_same_seed_and_config_give_the_same_loss_trace(uninterrupted, tmp_path):
    job = tmp_path / "again"
    proc = run_cli(*RESUMABLE, f"hydra.run.dir={job}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = loss_trace(uninterrupted), loss_trace(job)
    assert len(first) == 20 and first == second  # bit for bit, every logged step
    assert metrics(uninterrupted)["parameter_digests"] == metrics(job)["parameter_digests"]


# --- SIGTERM: a scheduler or a preemption asks the job to end ----------------------------------

def _stopped_cleanly(proc, log, job, world_size: int) -> int:
    """The run exited 143 with one line naming the step and the checkpoint; that checkpoint is
    complete and at the step named; nothing was evaluated or published. Returns the step."""
    out = log.read_text()
    assert proc.returncode == 143, (proc.returncode, out[-3000:])
    errors = [line for line in out.splitlines() if line.startswith("nlpwf: error:")]  # not the ranks' own
    assert len(errors) == 1 and "training stopped by SIGTERM" in errors[0] and "Traceback" not in out, out[-3000:]
    newest = checkpoints.newest_complete(job / "checkpoints")
    assert f"newest complete checkpoint: {newest}; continue with training.resume=auto" in errors[0]
    _assert_loadable(newest, world_size)
    assert not (job / "metrics.json").exists() and not (job / "model").exists()
    return checkpoints.step_of(newest)


def test_sigterm_stops_at_a_complete_checkpoint_and_the_run_resumes_to_the_same_result(uninterrupted, tmp_path):
    job, log = tmp_path / "job", tmp_path / "term.log"
    # save_steps=1000: the only checkpoints are the epoch end (step 10) and the one SIGTERM asks for
    proc = start_cli(*RESUMABLE, "training.save_steps=1000", f"hydra.run.dir={job}", log=log)
    wait_for(lambda: "'loss'" in log.read_text(), proc, timeout=300)  # training is under way
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    step = _stopped_cleanly(proc, log, job, world_size=1)
    assert f"training stopped by SIGTERM at step {step} of 20" in log.read_text()
    assert step < 20

    resumed = run_cli(*RESUMABLE, "training.save_steps=1000", "training.resume=auto", f"hydra.run.dir={job}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = metrics(uninterrupted), metrics(job)
    assert abs(a["eval_loss"] - b["eval_loss"]) <= 1e-6 and a["eval_accuracy"] == b["eval_accuracy"]


def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path):
    """Azure ML or a scheduler may signal one process only: the ranks agree, checkpoint together
    and exit; the launcher reports a stop, not a failure."""
    job, log = tmp_path / "job", tmp_path / "term.log"
    proc = start_cli(*DDP, "training.save_steps=1000", f"hydra.run.dir={job}", log=log)
    wait_for(lambda: "'loss'" in log.read_text(), proc, timeout=300)
    ranks = _ranks(proc)
    ranks[1].send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    step = _stopped_cleanly(proc, log, job, world_size=2)
    out = log.read_text()
    assert out.count(f"training stopped by SIGTERM at step {step} of 10") == 2  # rank 0 and rank 1, same step
    assert "stopping the other ranks" not in out
    assert not any(psutil.pid_exists(p.pid) for p in ranks.values())


def test_jit_checkpoint_of_transformers_is_refused_with_the_reason(tmp_path):
    proc = run_cli(*RESUMABLE, "+training.enable_jit_checkpoint=true", f"hydra.run.dir={tmp_path / 'job'}")
    assert proc.returncode == 2 and "nlpwf already checkpoints on SIGTERM" in proc.stderr
