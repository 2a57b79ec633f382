"""Emulate: the generated Azure ML job run here as Azure ML runs it (snapshot copy as working
dir, one process per rank with Azure's env contract), with results collected as a download."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from tests.conftest import TINY, run_cli


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
    # each node ran in its own copy of the snapshot; rank 0 (node 0) wrote results into its pinned run dir
    assert f"model and metrics in {nodes_dir}/node-0/outputs" in out
    assert "[rank 1]" in out
    for node in ("node-0", "node-1"):
        assert (Path(nodes_dir) / node / "nlpwf_job.yaml").is_file()
        assert (Path(nodes_dir) / node / "outputs").is_dir()  # the process ran there
    assert not (Path(nodes_dir) / "node-1" / "outputs" / "metrics.json").exists()
    # every process ran the task with the run dir pinned to ./outputs, and none wrote .hydra/ there
    assert not [p for p in Path(nodes_dir).glob("node-*/outputs/.hydra")]

    job_dir = sweep / "0"
    assert (job_dir / ".hydra" / "config.yaml").is_file()  # Hydra's own job dir, made by the launcher here
    metrics = json.loads((job_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["nodes"] == 2 and metrics["processes_per_node"] == 1
    assert metrics["backend"] in ("gloo", "ccl")
    assert len(metrics["parameter_digests"]) == 2 and len(set(metrics["parameter_digests"])) == 1
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    # collected like a download: the job's ./outputs, and metrics.json beside Hydra's files
    assert (job_dir / "azureml" / "outputs" / "model").is_dir()
    assert json.loads((job_dir / "azureml" / "outputs" / "metrics.json").read_text()) == metrics
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
                                        r"working dirs are kept in \S+/scratch/nlpwf-\S+$"):
        with sweep:
            pass
    kept = list(scratch.glob("nlpwf-*/node-0"))
    assert len(kept) == 1 and (kept[0] / "nlpwf_job.yaml").is_file()
