"""--multirun through the local launcher: job dirs, summary.csv, Optuna; plugin discovery."""
from __future__ import annotations

import csv
import json

import pytest

from conftest import TINY, run_cli


def test_launcher_plugin_is_discovered():
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    names = {p.__name__ for p in Plugins.instance().discover(Launcher)}
    assert "NlpwfLocalLauncher" in names


@pytest.mark.slow
def test_basic_sweep_writes_job_dirs_and_summary(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("--multirun", *TINY, "training.learning_rate=2e-5,5e-5", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    lrs = [[o for o in r["overrides"].split() if o.startswith("training.learning_rate=")] for r in rows]
    assert lrs == [["training.learning_rate=2e-05"], ["training.learning_rate=5e-05"]]
    for i, r in enumerate(rows):
        metrics = json.loads((sweep / str(i) / "metrics.json").read_text())
        assert r["status"] == "COMPLETED" and float(r["eval_accuracy"]) == metrics["eval_accuracy"]
        assert (sweep / str(i) / "model" / "config.json").is_file()
    # Different learning rates give different training runs.
    assert rows[0]["train_loss"] != rows[1]["train_loss"]
    assert "best eval_accuracy" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_optuna_search_runs_trials_and_reports_the_best(tmp_path):
    sweep = tmp_path / "optuna"
    proc = run_cli(*TINY, "hparams_search=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "COMPLETED" for r in rows)
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_value" in best and "training.learning_rate" in best
    assert max(float(r["eval_accuracy"]) for r in rows) == float(best.split("best_value:")[1].split()[0])


@pytest.mark.parametrize("label,expected", [("DRY_RUN", "DRY_RUN"), ("SUBMITTED", "SUBMITTED"), (None, "COMPLETED")])
def test_summary_status_says_when_a_job_did_not_train_here(tmp_path, label, expected):
    """The launcher labels jobs it did not see train (an Azure dry run, a job submitted without
    waiting); a job whose metrics came back trained, whatever the label."""
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from nlpwf.results import summary

    cfg = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path)}, "job": {"num": 0}}})
    run = JobReturn(overrides=["nodes=2"], status=JobStatus.COMPLETED, hydra_cfg=cfg)
    assert summary.row(run, label)["status"] == expected
    (tmp_path / "metrics.json").write_text('{"eval_accuracy": 0.8}')  # results came back: trained
    assert summary.row(run, label)["status"] == "COMPLETED"
