"""Tracking and looking at results: wandb and MLflow together from a 2-process job, the run's
plot, line progress in log files, the config tree, the sweep plot."""
from __future__ import annotations

import json
import os
import pty

import pytest

from nlpwf.results import plots
from nlpwf.runtime import console
from nlpwf.training import tracking

from conftest import TINY, compose, run_cli

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # the shape of a wandb API key, not a real one


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A 2-process job with both trackers, progress bars on, output piped as in Azure ML's logs."""
    root = tmp_path_factory.mktemp("tracked")
    job = root / "job"
    proc = run_cli(*TINY, "training.disable_tqdm=false", "compute.processes_per_node=2", "logger=[wandb,mlflow]",
                   f"hydra.run.dir={job}", env={"WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, job, proc.stdout + proc.stderr


@pytest.mark.slow
def test_mlflow_run_in_a_sqlite_store_beside_the_job(tracked):
    from mlflow import MlflowClient

    root, job, _ = tracked
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")  # mlflow.set_tracking_uri would leak into later runs' env
    runs = client.search_runs([client.get_experiment_by_name("nlpwf").experiment_id])
    assert len(runs) == 1  # rank 0 only
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked0/job"
    assert run.info.run_id == json.loads((job / tracking.RUNS_FILE).read_text())["mlflow"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]  # the integration (64 pairs, 2 ranks x 16 a step)
    final = json.loads((job / "metrics.json").read_text())
    assert run.data.metrics["final/eval_accuracy"] == final["eval_accuracy"]  # nlpwf's own
    assert run.data.params["model.name"] == "tiny_bert" and run.data.params["compute.processes_per_node"] == "2"
    assert run.data.tags["nlpwf.overrides"].split()[-1] == "logger=[wandb,mlflow]"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "train_log.csv", plots.RUN_PLOT, "nlpwf_config.yaml"} <= artifacts
    assert not (root / "mlruns").exists()


@pytest.mark.slow
def test_wandb_offline_run_in_the_job_dir_without_the_key(tracked):
    root, job, out = tracked
    runs = list((job / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # rank 0 only, offline although a key is set, because WANDB_MODE says so
    assert runs[0].name.endswith(json.loads((job / tracking.RUNS_FILE).read_text())["wandb"])
    files = [p for p in root.rglob("*") if p.is_file()]
    assert not any(FAKE_KEY.encode() in p.read_bytes() for p in files)  # the secret is nowhere on disk
    assert FAKE_KEY not in out  # nor in the output


@pytest.mark.slow
def test_run_plot_and_line_progress(tracked):
    _, job, out = tracked
    png = (job / plots.RUN_PLOT).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "\r" not in out  # no tqdm redraws in a piped log
    assert "train: step 2/2 (100%)" in out and "eval: done in" in out
    assert out.count("├── training") == 1  # the config tree, printed once for the whole job
    assert "│   ├── learning_rate: 5e-05" in out


def test_wandb_is_offline_unless_a_key_is_set():
    assert tracking.wandb_mode({}) == "offline"
    assert tracking.wandb_mode({"WANDB_API_KEY": FAKE_KEY}) == "online"
    assert tracking.wandb_mode({"WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "disabled"}) == "disabled"


def test_mlflow_uses_azure_tracking_uri_when_set(tmp_path, monkeypatch):
    cfg = compose("logger=mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    expected = f"sqlite:///{tmp_path / 'outputs' / 'day' / 'mlflow.db'}"
    assert tracking.mlflow_uri(cfg.logger.mlflow, tmp_path / "outputs" / "day" / "time") == expected
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "azureml://eastus.api.azureml.ms/mlflow/v1.0/subscriptions/x")
    assert tracking.mlflow_uri(cfg.logger.mlflow, tmp_path / "job").startswith("azureml://")


def test_output_root_is_the_folder_of_job_dirs(tmp_path):
    assert tracking.output_root(tmp_path / "outputs" / "2026-11-25" / "18-00-00", cwd=tmp_path) == tmp_path / "outputs"
    assert tracking.output_root(tmp_path / "elsewhere" / "job", cwd=tmp_path / "project") == tmp_path / "elsewhere"
    assert tracking.output_root(tmp_path / "job", cwd=tmp_path) == tmp_path  # beside a job dir, not inside it


def test_progress_bars_stay_in_a_terminal():
    leader, follower = pty.openpty()
    try:
        with os.fdopen(follower, "w") as tty:
            assert console.interactive(tty)
        r, w = os.pipe()
        with os.fdopen(w, "w") as pipe:
            assert not console.interactive(pipe)
        os.close(r)
    finally:
        os.close(leader)


def test_sweep_plot_has_a_panel_per_swept_parameter(tmp_path):
    rows = [{"overrides": f"model=tiny_bert training.learning_rate={lr} precision={p}", "eval_accuracy": acc}
            for lr, p, acc in (("2e-05", "fp32", 0.6), ("5e-05", "bf16", 0.7), ("1e-03", "fp32", 0.5))]
    rows.append({"overrides": "model=tiny_bert training.learning_rate=1e-2 precision=fp32", "eval_accuracy": ""})  # failed
    assert set(plots.swept_values(rows[:3])) == {"training.learning_rate", "precision"}  # model did not vary
    out = plots.sweep(rows, "eval_accuracy", tmp_path / plots.SWEEP_PLOT)
    assert out.read_bytes().startswith(b"\x89PNG")
    assert plots.sweep(rows[:1], "eval_accuracy", tmp_path / "one.png") is None  # nothing varies: no plot


# --- inside an Azure ML job: the run Azure ML created for it ------------------------------------

@pytest.fixture
def azure_run(tmp_path, monkeypatch):
    """A local MLflow store standing in for Azure's: a run made beforehand with the job's name, and
    the two variables Azure ML sets in its jobs (MLFLOW_TRACKING_URI, MLFLOW_RUN_ID)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'azure.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("nlpwf", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment, run_name="calm_lemon_x1y2")  # Azure's job name
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    yield client, run.info.run_id
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()


def test_an_azure_job_reports_to_mlflow_whatever_the_logger():
    cfg = compose("logger=none")
    assert tracking.report_to(cfg.logger) == []
    env = {"MLFLOW_TRACKING_URI": "azureml://westeurope.api.azureml.ms/mlflow/v1.0/subscriptions/x", "MLFLOW_RUN_ID": "r"}
    assert tracking.job_run(env) == (env["MLFLOW_TRACKING_URI"], "r")
    assert tracking.job_run({"MLFLOW_TRACKING_URI": "sqlite:///x.db"}) is None  # a local store: no job run


def test_rank_0_logs_into_the_job_run_without_renaming_it(azure_run, tmp_path):
    from hydra.core.hydra_config import HydraConfig

    client, run_id = azure_run
    cfg = compose("logger=none", "training.learning_rate=3e-05", return_hydra_config=True)
    assert tracking.report_to(cfg.logger) == ["mlflow"]  # the training curve too (transformers' MLflowCallback)
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)  # as on the nodes: the payload's config, with the point's overrides
    try:
        job_dir = tmp_path / "outputs"  # no .hydra/ there: the remote job writes none
        job_dir.mkdir()
        task_cfg = compose("logger=none", "training.learning_rate=3e-05")  # the task's part, without hydra
        tracker = tracking.start(task_cfg, job_dir, is_main=True)
        assert tracker is not None and tracker.run_ids()["mlflow"] == run_id
        import os

        assert "MLFLOW_RUN_ID" not in os.environ  # so the MLflowCallback reuses the run instead of starting one
        (job_dir / "metrics.json").write_text('{"eval_accuracy": 0.75}')
        tracker.finish({"eval_accuracy": 0.75, "model": "tiny_bert"}, [job_dir / "metrics.json"])
    finally:
        HydraConfig.instance().cfg = previous
    run = client.get_run(run_id)
    assert run.info.run_name == "calm_lemon_x1y2"  # the job's name, as Studio shows it
    assert run.data.tags["nlpwf.overrides"] == "logger=none training.learning_rate=3e-05"
    assert run.data.metrics["final/eval_accuracy"] == 0.75
    assert run.data.params["training.learning_rate"] == "3e-05" and run.data.params["model.name"]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"metrics.json", "nlpwf_config.yaml"}
    assert len(client.search_runs([run.info.experiment_id])) == 1  # no other run was started


def test_not_the_main_rank_logs_nothing(azure_run, tmp_path):
    assert tracking.start(compose("logger=none"), tmp_path, is_main=False) is None


@pytest.mark.slow
def test_training_in_an_azure_job_fills_the_job_run(azure_run, tmp_path):
    """A whole training with logger=none, as a job's rank 0 runs it: the training curve
    (MLflowCallback), nlpwf's final metrics and params land in Azure's run, still named as before."""
    import os

    client, run_id = azure_run
    job = tmp_path / "job"
    proc = run_cli(*TINY, "logger=none", f"hydra.run.dir={job}",
                   env={"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_RUN_ID": run_id})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = client.get_run(run_id)
    assert run.info.run_name == "calm_lemon_x1y2"
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert steps and steps == sorted(steps)  # the training curve, from transformers' MLflowCallback
    assert "final/eval_accuracy" in run.data.metrics and run.data.params["model.name"] == "tiny_bert"
    assert run.data.tags["nlpwf.overrides"].split()[-1] == "logger=none"
    assert len(client.search_runs([run.info.experiment_id])) == 1
