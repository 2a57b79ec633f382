"""Emulate: the generated Azure ML job run here as Azure ML runs it (snapshot copy as working
dir, one process per rank with Azure's env contract), with results collected as a download."""
from __future__ import annotations

import csv
import json
import re

from tests.conftest import TINY, run_cli


def test_two_node_job_trains_with_ddp_from_the_snapshot(tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli("experiment=quickstart", "compute=d32_v5", "nodes=2", "compute.processes_per_node=1",
                "hydra.launcher.emulate=true", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    workdir = re.search(r"emulating Azure ML job \S+ here: 2 node\(s\) x 1 process\(es\), .* in (\S+)", out).group(1)
    # rank 0 wrote into the pinned run dir of the snapshot copy, as on an Azure node
    assert f"model and metrics in {workdir}/outputs" in out
    assert "[rank 1]" in out

    job_dir = sweep / "0"
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


def test_two_point_multirun_returns_two_results(tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli("--multirun", "compute=d32_v5", "compute.processes_per_node=1", "hydra.launcher.emulate=true", *TINY,
                "training.learning_rate=1e-4,3e-4", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [row["job"] for row in rows] == ["0", "1"]
    assert [row["status"] for row in rows] == ["COMPLETED", "COMPLETED"]
    rates = [float(row["overrides"].split("training.learning_rate=")[1].split()[0]) for row in rows]
    assert rates == [1e-4, 3e-4]
    for i, row in enumerate(rows):
        metrics = json.loads((sweep / str(i) / "metrics.json").read_text())
        assert float(row["eval_accuracy"]) == metrics["eval_accuracy"]
        assert (sweep / str(i) / "azureml" / "job.yaml").is_file()


def test_failing_job_fails_and_keeps_its_working_dir(tmp_path):
    sweep = tmp_path / "sweep"
    # a key transformers does not know: the remote process rejects it (exit 2), as it would on Azure
    r = run_cli("compute=d32_v5", "compute.processes_per_node=1", "hydra.launcher.emulate=true", *TINY,
                "+training.not_a_field=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 2
    assert "training.not_a_field is not a TrainingArguments field" in r.stdout + r.stderr
    assert "nlpwf: error: the emulated job" in r.stderr
