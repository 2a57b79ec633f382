"""Emulate: the generated Azure ML job run here as Azure ML runs it (snapshot copy as working
dir, one process per rank with Azure's env contract), with results collected as a download."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import TINY, run_cli


@pytest.mark.slow
def test_two_node_job_trains_with_ddp_from_the_snapshot(tmp_path):
    sweep, scratch = tmp_path / "sweep", tmp_path / "scratch"
    r = run_cli("experiment=quickstart", "compute=d32_v5", "nodes=2", "compute.processes_per_node=1",
                "hydra.launcher.emulate=true", f"hydra.launcher.emulate_dir={scratch}", *TINY,
                f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    nodes_dir = re.search(r"emulating Azure ML job \S+ here: 2 node\(s\) x 1 process\(es\), .* in (\S+)/node-N", out).group(1)
    assert nodes_dir.startswith(str(scratch))
    job_dir = sweep / "0"
    results = job_dir / "azureml" / "named_outputs" / "results"
    # each node ran in its own copy of the snapshot; rank 0 wrote results into the results output
    assert f"model and metrics in {results}" in out
    assert "[rank 1]" in out
    for node in ("node-0", "node-1"):
        assert (Path(nodes_dir) / node / "nlpwf_job.yaml").is_file()
        assert not (Path(nodes_dir) / node / "outputs").exists()  # the run dir is the named output, not ./outputs
    # every process ran the task with the run dir on the output, and none wrote .hydra/ there
    assert not (results / ".hydra").exists() and (results / "metrics.json").is_file()

    assert (job_dir / ".hydra" / "config.yaml").is_file()  # Hydra's own job dir, made by the launcher here
    metrics = json.loads((job_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["nodes"] == 2 and metrics["processes_per_node"] == 1
    assert metrics["backend"] in ("gloo", "ccl")
    assert len(metrics["parameter_digests"]) == 2 and len(set(metrics["parameter_digests"])) == 1
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    # collected like a download of the results output, and metrics.json beside Hydra's files
    assert json.loads((results / "metrics.json").read_text()) == metrics
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["COMPLETED"]
    assert float(rows[0]["eval_accuracy"]) == metrics["eval_accuracy"]


@pytest.mark.slow
def test_two_point_multirun_returns_two_results(hydra_sweep_runner, hydra_restore_singletons, tmp_path):
    """In process, to see what the launcher hands the sweeper: each point's objective, as nlpwf's
    task returned it in the emulated job."""
    from hydra import version

    from nlpwf import CONF_DIR, cli

    version.setbase("1.3")  # nlpwf's own (hydra.main's); restored after the test
    sweep = hydra_sweep_runner(
        calling_file=None, calling_module="nlpwf.cli", task_function=cli.main.__wrapped__,
        config_path=str(CONF_DIR), config_name="config", temp_dir=tmp_path / "sweep",
        overrides=["compute=d32_v5", "compute.processes_per_node=1", "hydra.launcher.emulate=true", *TINY,
                   "training.learning_rate=1e-4,3e-4"],
    )
    with sweep:
        runs = sweep.returns[0]
        assert [r.overrides[-1] for r in runs] == ["training.learning_rate=0.0001", "training.learning_rate=0.0003"]
        assert [r.hydra_cfg.hydra.job.num for r in runs] == [0, 1]
        for r in runs:
            job_dir = Path(r.hydra_cfg.hydra.runtime.output_dir)
            metrics = json.loads((job_dir / "metrics.json").read_text())
            assert r.return_value == metrics["eval_accuracy"]
            assert metrics["world_size"] == 1 and (job_dir / "azureml" / "job.yaml").is_file()
        rows = list(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))
        assert [row["status"] for row in rows] == ["COMPLETED", "COMPLETED"]
        assert [float(row["eval_accuracy"]) for row in rows] == [r.return_value for r in runs]


def test_failing_job_is_a_failed_result_and_keeps_its_working_dirs(hydra_sweep_runner, hydra_restore_singletons, tmp_path):
    """The job's env vars reach its processes; here one (PYTHONHOME) keeps Python from starting at all,
    as a broken image would on Azure: the job fails, the sweep reports it, the node dirs stay."""
    from hydra import version

    from nlpwf import CONF_DIR, cli
    from nlpwf.errors import JobFailed

    version.setbase("1.3")
    scratch = tmp_path / "scratch"
    sweep = hydra_sweep_runner(
        calling_file=None, calling_module="nlpwf.cli", task_function=cli.main.__wrapped__,
        config_path=str(CONF_DIR), config_name="config", temp_dir=tmp_path / "sweep",
        overrides=["compute=d32_v5", "compute.processes_per_node=1", "hydra.launcher.emulate=true", *TINY,
                   f"hydra.launcher.emulate_dir={scratch}", "+hydra.launcher.environment_variables.PYTHONHOME=/nonexistent"],
    )
    with pytest.raises(JobFailed, match=r"the emulated Azure ML job nlpwf-\S+ exited with code 1 .*; its nodes' "
                                        r"working dirs are kept in \S+/scratch/nlpwf-\S+; its outputs are in \S+$"):
        with sweep:
            pass
    kept = list(scratch.glob("nlpwf-*/node-0"))
    assert len(kept) == 1 and (kept[0] / "nlpwf_job.yaml").is_file()


# --- strict as the service: inputs, outputs, the env contract, preemption --------------------------

def test_azureml_workers_see_only_azures_contract(monkeypatch, capfd):
    """No LOCAL_WORLD_SIZE or OMP_NUM_THREADS (not even inherited from here), a master address
    that is not loopback, and the job's own variables."""
    import sys

    from nlpwf.runtime import workers

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "7")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    show = "import os, json; print('ENV', json.dumps({k: os.environ.get(k) for k in %r}))" % (
        ["LOCAL_WORLD_SIZE", "OMP_NUM_THREADS", "MASTER_ADDR", "RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "JOBVAR"],)
    code = workers.run_workers([sys.executable, "-c", show], 2, 2, extra_env={"JOBVAR": "x", "GLOO_SOCKET_IFNAME": "eth0"},
                               azureml=True)
    assert code == 0
    seen = [json.loads(line.split("ENV ", 1)[1]) for line in capfd.readouterr().out.splitlines() if "ENV " in line]
    assert len(seen) == 4
    assert {(e["RANK"], e["LOCAL_RANK"], e["NODE_RANK"]) for e in seen} == {("0", "0", "0"), ("1", "1", "0"),
                                                                            ("2", "0", "1"), ("3", "1", "1")}
    for e in seen:
        assert e["LOCAL_WORLD_SIZE"] is None and e["OMP_NUM_THREADS"] is None and e["JOBVAR"] == "x"
        assert e["WORLD_SIZE"] == "4" and e["MASTER_ADDR"] not in ("127.0.0.1", "localhost", "::1")


def _emulate(tmp_path, data: Path, name: str, datastore: Path, *extra: str, popen: bool = False):
    import os
    import subprocess
    import sys

    from conftest import OFFLINE_ENV

    args = ["experiment=quickstart", "dataset=mrpc", f"dataset.data_dir={data}", "compute=d32_v5", "nodes=2",
            "model=tiny_bert", "dataset.max_train_samples=128", "dataset.max_eval_samples=32",
            "training.num_train_epochs=2", "training.per_device_train_batch_size=4", "training.save_steps=2",
            "training.logging_steps=1", "training.disable_tqdm=true", "training.save_total_limit=3",
            "hydra.launcher.emulate=true", f"hydra.launcher.emulate_datastore={datastore}",
            "+hydra.launcher.environment_variables.OMP_NUM_THREADS=1",  # the VM's 8 would oversubscribe 2 cores
            f"hydra.sweep.dir={tmp_path / name}", *extra]
    if popen:
        log = open(tmp_path / f"{name}.log", "w")
        return subprocess.Popen([sys.executable, "-m", "nlpwf", *args], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **OFFLINE_ENV}, text=True)
    return run_cli(*args, cwd=tmp_path, timeout=1500)


def _wait_for(predicate, proc, timeout: float = 900):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        assert proc.poll() is None, "the emulated job ended before the test could act"
        time.sleep(0.1)
    raise AssertionError("timed out")


def _kill_tree(proc) -> None:
    """A preemption: every process of the emulated job dies at once, without a chance to checkpoint."""
    import psutil

    parent = psutil.Process(proc.pid)
    for p in [*parent.children(recursive=True), parent]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)


@pytest.fixture
def mrpc_dir(tmp_path) -> Path:
    from conftest import pairs, write_glue

    d = tmp_path / "mrpc"
    d.mkdir()
    write_glue(d / "train.tsv", pairs(128))
    write_glue(d / "dev.tsv", pairs(32, start=500))
    return d


@pytest.mark.slow
def test_emulated_job_reads_its_input_copy_and_resumes_after_a_preemption(tmp_path, mrpc_dir):
    import stat

    from nlpwf.training import checkpoints

    # 1. uninterrupted; the original data folder is renamed as soon as the job's copy exists
    full = _emulate(tmp_path, mrpc_dir, "full", tmp_path / "store-full", popen=True)
    job_dir = tmp_path / "full" / "0"
    mount = _wait_for(lambda: next(iter((job_dir / "azureml" / "emulate" / "mounts").glob("dataset_data_dir")), None), full)
    mounted_modes = [p.stat().st_mode for p in [mount, *mount.iterdir()]]
    moved = mrpc_dir.rename(tmp_path / "mrpc-moved")
    assert full.wait(timeout=1500) == 0, (tmp_path / "full.log").read_text()[-5000:]
    log = (tmp_path / "full.log").read_text()
    assert f"data_dir: {mount}" in log  # the config on the nodes names the copy, not the original
    assert all(not (m & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) for m in mounted_modes)  # read-only copy
    name = yaml.safe_load((job_dir / "azureml" / "job.yaml").read_text())["name"]
    ckpt_output = tmp_path / "store-full" / "workspaceblobstore" / "nlpwf" / "checkpoints" / name
    assert [checkpoints.step_of(p) for p in checkpoints.complete_checkpoints(ckpt_output)][-1] == 16
    # the shared output holds every rank's RNG state (two nodes' processes), and the marker vouches for all of them
    marker = json.loads((ckpt_output / "checkpoint-16" / checkpoints.MARKER).read_text())
    assert marker["world_size"] == 4 and {f"rng_state_{r}.pth" for r in range(4)} <= set(marker["files"])
    assert not (job_dir / "checkpoints").exists()
    expected = json.loads((job_dir / "metrics.json").read_text())
    # without LOCAL_WORLD_SIZE, each of a node's two processes pinned itself to its own half of the cores
    procs = expected["perf_processes"]
    assert [p["local_rank"] for p in procs] == [0, 1, 0, 1]
    import os
    half = len(os.sched_getaffinity(0)) // 2
    for node in (procs[:2], procs[2:]):
        assert all(p["affinity"] == "pinned" and len(p["cores"]) == half for p in node)
        assert not set(node[0]["cores"]) & set(node[1]["cores"])

    # 2. the same job, preempted (every process killed) after a checkpoint is complete
    store = tmp_path / "store"
    first = _emulate(tmp_path, moved, "first", store, popen=True)
    first_dir = tmp_path / "first" / "0"
    name = _wait_for(lambda: (first_dir / "azureml" / "job.yaml").is_file()
                     and yaml.safe_load((first_dir / "azureml" / "job.yaml").read_text())["name"], first)
    ckpts = store / "workspaceblobstore" / "nlpwf" / "checkpoints" / name
    _wait_for(lambda: checkpoints.newest_complete(ckpts), first)
    _kill_tree(first)
    reached = checkpoints.step_of(checkpoints.newest_complete(ckpts))
    assert reached < 16 and not (first_dir / "metrics.json").exists()

    # 3. started again on the same checkpoints output: it resumes, and ends as the uninterrupted run
    again = _emulate(tmp_path, moved, "again", store, f"hydra.launcher.checkpoints_from={name}")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert re.search(rf"training.resume=auto: resuming from \S+/{name}/checkpoint-(\d+)", out)
    resumed = json.loads((tmp_path / "again" / "0" / "metrics.json").read_text())
    assert resumed["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-4)
    assert resumed["eval_accuracy"] == expected["eval_accuracy"]
    print(f"resumed from step >= {reached}: eval_loss {resumed['eval_loss']!r} vs uninterrupted {expected['eval_loss']!r}")
