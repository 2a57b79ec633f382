"""Emulate: the generated Azure ML job run here as Azure ML runs it (snapshot copy as working
dir, one process per rank with Azure's env contract), with results collected as a download."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from nlpwf.results import files

from conftest import TINY

# --- outside the nodes: every rename and chmod they make, and the environment they start with ------

TRACED = "execve,chdir,fchdir,clone,clone3,fork,vfork,rename,renameat,renameat2,chmod,fchmod,fchmodat"
_STRING = r'"((?:[^"\\]|\\.)*)"'
_FD = r"(AT_FDCWD|-?\d+)(?:<([^>]*)>)?"


def _syscalls(trace: Path) -> list[tuple[int, str, str, str]]:
    """(pid, call, arguments, result) of every call of an `strace -f` file, an unfinished call
    joined with its resumption."""
    pending, calls = {}, []
    for line in trace.read_text(errors="replace").splitlines():
        pid, _, rest = line.partition(" ")
        rest = rest.lstrip()
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")]
            continue
        resumed = re.match(r"<\.\.\. (\w+) resumed>(.*)", rest)
        if resumed:
            rest = pending.pop(pid, f"{resumed.group(1)}(") + resumed.group(2)
        m = re.match(r"(\w+)\((.*)\)\s+=\s+(\S+)", rest, re.S)
        if m and pid.isdigit():
            calls.append((int(pid), m.group(1), m.group(2), m.group(3)))
    return calls


def _changed_paths(calls, start_cwd: Path) -> list[tuple[str, list[Path], str]]:
    """(call, absolute paths, result) of every rename and chmod, following each process's working
    dir (chdir, fchdir, inherited at fork) to resolve relative paths."""
    cwd: dict[int, Path] = {}
    found = []
    for pid, name, args, result in calls:
        here = cwd.setdefault(pid, start_cwd)
        strings = [Path(here, s) for s in re.findall(_STRING, args)]
        if name in ("clone", "clone3", "fork", "vfork") and result.isdigit():
            cwd.setdefault(int(result), here)  # unless the child has already said where it is
        elif name == "chdir" and result == "0":
            cwd[pid] = strings[0]
        elif name == "fchdir" and result == "0":
            cwd[pid] = Path(re.match(_FD, args).group(2))
        elif name == "fchmod":
            found.append((name, [Path(re.match(_FD, args).group(2) or "?")], result))
        elif name in ("rename", "chmod"):
            found.append((name, strings, result))
        elif name in ("renameat", "renameat2", "fchmodat"):
            found.append((name, [Path(d or here, s) for _, d, s in re.findall(_FD + r",\s*" + _STRING, args)], result))
    return found


def _node_environments(calls) -> list[dict[str, str]]:
    """The environment each node's Python started with: the execve of the job's command."""
    envs = []
    for _, name, args, result in calls:
        if name == "execve" and result == "0" and "nlpwf.azureml.remote" in args and "noderules.py" in args:
            env_part = args[args.index("], [") + 4:]
            envs.append(dict(s.split("=", 1) for s in re.findall(_STRING, env_part)))
    return envs


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_two_node_job_publishes_as_blob_mounts_take_it_seen_from_outside(tmp_path, mrpc_dir):
    """The emulated 2-node job (2 processes each) under strace: no chmod and no rename of nlpwf's
    files or folders on any path of its output mounts (each node's view and the datastore), only
    the allow-listed environment on the nodes, metrics on the MLflow run created for the job, a log
    per rank, and checkpoint markers that list files rank 0 could not see. (Not strace's
    --seccomp-bpf: under it a rank intermittently aborts at exit, main's code alike.)"""
    from mlflow.tracking import MlflowClient

    from nlpwf.runtime.contract import CONTRACT
    from nlpwf.training import checkpoints

    scratch, store, tracking, trace = tmp_path / "scratch", tmp_path / "store", tmp_path / "tracking", tmp_path / "trace"
    r = _emulate(tmp_path, mrpc_dir, "job", store, "dataset.max_train_samples=32", f"hydra.launcher.emulate_dir={scratch}",
                 f"++hydra.launcher.emulate_tracking_dir={tracking}",
                 wrap=["strace", "-f", "-v", "-y", "-s", "8192", "-e", f"trace={TRACED}", "-o", str(trace)])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    job_dir, [nodes_dir] = tmp_path / "job" / "0", list(scratch.glob("nlpwf-*"))
    results = job_dir / "azureml" / "named_outputs" / "results"
    mounts = [nodes_dir / "outputs", store, job_dir / "azureml" / "named_outputs"]
    calls = _syscalls(trace)

    # 1. nothing renamed or chmod-ed under a mount but a library's save of one weights file
    on_mounts = [(name, paths, res) for name, paths, res in _changed_paths(calls, tmp_path)
                 if any(m in p.parents for p in paths for m in mounts)]
    weights = [c for c in on_mounts if c[0].startswith("rename") and c[1][1].name == "model.safetensors"
               and c[1][0].parent == c[1][1].parent and not Path(c[1][1]).is_dir()]
    assert [c for c in on_mounts if c not in weights] == []
    assert any(name.startswith("rename") and res == "0" for name, _, res in _changed_paths(calls, tmp_path)), \
        "the trace saw no rename at all: it watched nothing"

    # 2. each node process started with the allow-list: Azure's contract, the MLflow run's, the job's, PATH
    envs = _node_environments(calls)
    job_env = yaml.safe_load((job_dir / "azureml" / "job.yaml").read_text())["environment_variables"]
    mlflow_vars = {"MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"}
    assert len(envs) == 4
    for env in envs:
        assert set(env) == {*CONTRACT, *mlflow_vars, *job_env, "PATH", "PWD", "OLDPWD"}  # PWD, OLDPWD: the shell's
        assert env["PATH"].split(":")[0] == str(nodes_dir / "bin") and env["MLFLOW_TRACKING_URI"].startswith("http://")

    # 3. rank 0's metrics, parameters and overrides in the job's run (the server's store, read after it stopped)
    client = MlflowClient(tracking_uri=f"sqlite:///{tracking / 'mlflow.db'}")
    run = client.get_run(envs[0]["MLFLOW_RUN_ID"])
    metrics = json.loads((job_dir / "metrics.json").read_text())
    assert run.data.metrics["final/eval_accuracy"] == metrics["eval_accuracy"] and "loss" in run.data.metrics
    assert run.data.params["training.learning_rate"] and "nodes=2" in run.data.tags["nlpwf.overrides"]
    assert run.info.status == "FINISHED"

    # 4. published with its marker, a log per rank: rank 0's at the top, the others' in logs/
    assert metrics["world_size"] == 4 and len(set(metrics["parameter_digests"])) == 1
    assert {"metrics.json", "nlpwf.log", "model/model.safetensors", "task_return.pkl"} <= set(files.listed(results))
    assert "training tiny_bert on mrpc" in (results / "nlpwf.log").read_text()
    assert sorted(p.name for p in (results / "logs").iterdir()) == [f"nlpwf.rank-{r}.log" for r in (1, 2, 3)]
    rows = list(csv.DictReader((tmp_path / "job" / "summary.csv").open()))
    assert [row["status"] for row in rows] == ["COMPLETED"] and float(rows[0]["eval_accuracy"]) == metrics["eval_accuracy"]

    # 5. the last checkpoint's marker lists every rank's RNG state, though rank 0 saw node 1's late
    name = yaml.safe_load((job_dir / "azureml" / "job.yaml").read_text())["name"]
    last = checkpoints.newest_complete(store / "workspaceblobstore" / "nlpwf" / "checkpoints" / name)
    marker = json.loads((last / checkpoints.MARKER).read_text())
    assert {f"rng_state_{r}.pth" for r in range(4)} <= set(marker["files"])
    assert not {"rng_state_2.pth", "rng_state_3.pth"} & set(marker["ranks"][0])


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
    """No LOCAL_WORLD_SIZE or OMP_NUM_THREADS, nothing else inherited from here either, a master
    address that is not loopback, and the job's own variables."""
    import sys

    from nlpwf.runtime import workers

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "7")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setenv("NLPWF_SHELL_CANARY", "7")
    show = "import os, json; print('ENV', json.dumps({k: os.environ.get(k) for k in %r}))" % (
        ["LOCAL_WORLD_SIZE", "OMP_NUM_THREADS", "MASTER_ADDR", "RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "JOBVAR",
         "NLPWF_SHELL_CANARY", "HOME"],)
    code = workers.run_workers([sys.executable, "-c", show], 2, 2, extra_env={"JOBVAR": "x", "GLOO_SOCKET_IFNAME": "eth0"},
                               azureml=True)
    assert code == 0
    seen = [json.loads(line.split("ENV ", 1)[1]) for line in capfd.readouterr().out.splitlines() if "ENV " in line]
    assert len(seen) == 4
    assert {(e["RANK"], e["LOCAL_RANK"], e["NODE_RANK"]) for e in seen} == {("0", "0", "0"), ("1", "1", "0"),
                                                                            ("2", "0", "1"), ("3", "1", "1")}
    for e in seen:
        assert e["LOCAL_WORLD_SIZE"] is None and e["OMP_NUM_THREADS"] is None and e["JOBVAR"] == "x"
        assert e["NLPWF_SHELL_CANARY"] is None and e["HOME"] is None  # an allow-list: nothing of this shell
        assert e["WORLD_SIZE"] == "4" and e["MASTER_ADDR"] not in ("127.0.0.1", "localhost", "::1")


def _emulate(tmp_path, data: Path, name: str, datastore: Path, *extra: str, popen: bool = False, wrap: list[str] = ()):
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
            # the nodes inherit nothing of this shell: the tests' offline mode and datasets cache go in the job
            "+hydra.launcher.environment_variables.HF_HUB_OFFLINE=1",
            f"+hydra.launcher.environment_variables.HF_DATASETS_CACHE={os.environ['HF_DATASETS_CACHE']}",
            f"hydra.sweep.dir={tmp_path / name}", *extra]
    if popen:
        log = open(tmp_path / f"{name}.log", "w")
        return subprocess.Popen([sys.executable, "-m", "nlpwf", *args], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **OFFLINE_ENV}, text=True)
    return subprocess.run([*wrap, sys.executable, "-m", "nlpwf", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=1500, env={**os.environ, **OFFLINE_ENV})


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
    # its marker lists every rank's files, each in the datastore at its size (the resumed job rotates it away later)
    marker = json.loads((ckpts / f"checkpoint-{reached}" / checkpoints.MARKER).read_text())
    assert {f"rng_state_{r}.pth" for r in range(4)} <= set(marker["files"]) and len(marker["ranks"]) == 4

    # 3. started again on the same checkpoints output: it resumes, and ends as the uninterrupted run
    again = _emulate(tmp_path, moved, "again", store, f"hydra.launcher.checkpoints_from={name}")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = again.stdout + again.stderr
    # node 0's view of the checkpoints output, which the new job mounts with what the datastore holds
    resumed_from = int(re.search(r"training.resume=auto: resuming from \S+/outputs/node-0/checkpoints/checkpoint-(\d+)",
                                 out).group(1))
    assert resumed_from == reached
    resumed = json.loads((tmp_path / "again" / "0" / "metrics.json").read_text())
    assert resumed["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-4)
    assert resumed["eval_accuracy"] == expected["eval_accuracy"]
    print(f"resumed from step >= {reached}: eval_loss {resumed['eval_loss']!r} vs uninterrupted {expected['eval_loss']!r}")
