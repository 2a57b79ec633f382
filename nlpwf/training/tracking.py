"""Experiment tracking: Weights & Biases and MLflow, from rank 0 only.

transformers' WandbCallback and MLflowCallback (selected through `report_to`) log the training
curve. They reuse a run that is already active, so nlpwf opens the runs itself first and gives
them what the callbacks cannot know: a run name from the job dir, the whole Hydra config, the
sweep overrides, the MLflow store, reattaching to the same run when a job resumes. At the end
nlpwf adds the final metrics and the job's files (metrics, train log, plots) and closes them;
a job that dies on an exception is marked failed. Each logger option of conf/logger/ adds its
own node (`logger.wandb`, `logger.mlflow`), so `logger=[wandb,mlflow]` selects both.

Inside an Azure ML job, Azure ML has already created the MLflow run Studio shows for the job
and says so through MLFLOW_TRACKING_URI (azureml://...) and MLFLOW_RUN_ID. Rank 0 then logs the
metrics, parameters and the overrides into that run whatever `logger` says (the other loggers
still run), and leaves its name alone (Studio shows the job's display name).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nlpwf.results import files

log = logging.getLogger(__name__)

INTEGRATIONS = ("wandb", "mlflow")  # logger option → transformers report_to name (the same here)
RUNS_FILE = "tracking_runs.json"  # run ids, so a resumed job reports into the same runs


def job_run(env=os.environ) -> tuple[str, str] | None:
    """(tracking URI, run id) of the MLflow run the platform made for this job (Azure ML sets
    both in its jobs: MLFLOW_TRACKING_URI=azureml://..., MLFLOW_RUN_ID), else None."""
    uri, run_id = env.get("MLFLOW_TRACKING_URI"), env.get("MLFLOW_RUN_ID")
    return (uri, run_id) if uri and run_id else None


def report_to(logger_cfg: DictConfig) -> list[str]:
    names = [name for name in INTEGRATIONS if logger_cfg.get(name) is not None]
    if job_run() is not None and "mlflow" not in names:
        names.append("mlflow")  # the training curve into the job's own run (Studio's Metrics tab)
    return names


def wandb_mode(env=os.environ) -> str:
    """Offline (files under the job dir, `wandb sync` later) unless there is an API key;
    an explicit WANDB_MODE wins."""
    return env.get("WANDB_MODE") or ("online" if env.get("WANDB_API_KEY") else "offline")


def output_root(job_dir: Path, cwd: Path | None = None) -> Path:
    """The folder that holds the job dirs: `outputs/` or `multirun/` under the directory nlpwf was
    started in, or the job dir's parent when it lives elsewhere or right in that directory
    (`hydra.run.dir=job`: the store goes beside the job, not into it)."""
    job_dir, cwd = Path(job_dir).resolve(), Path(cwd or os.getcwd()).resolve()
    try:
        parts = job_dir.relative_to(cwd).parts
    except ValueError:
        return job_dir.parent
    return cwd / parts[0] if len(parts) > 1 else job_dir.parent


def mlflow_uri(mlflow_cfg: DictConfig, job_dir: Path) -> str:
    """The configured URI, else the one Azure ML sets for its jobs, else a local SQLite store."""
    return (mlflow_cfg.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{output_root(job_dir) / 'mlflow.db'}")


def run_name(job_dir: Path) -> str:
    """`<date>/<time>` of a run, `<time>/<job number>` of a sweep point: unique and readable."""
    return "/".join(Path(job_dir).resolve().parts[-2:])


def overrides(job_dir: Path) -> list[str]:
    """The command-line overrides of this job, as the launching process recorded them (workers
    re-enter with the resolved config and have none of their own): .hydra/overrides.yaml in the
    job dir, else Hydra's config of the running job (an Azure ML job writes no .hydra/; its
    payload's config carries the sweep point's overrides)."""
    from hydra.core.hydra_config import HydraConfig

    path = Path(job_dir) / ".hydra" / "overrides.yaml"
    if path.is_file():
        found = list(OmegaConf.load(path))
    elif HydraConfig.initialized():
        found = list(OmegaConf.select(HydraConfig.get(), "overrides.task", default=None) or [])
    else:
        found = []
    return [str(o) for o in found if not str(o).startswith("hydra.")]


def _flat(cfg: DictConfig) -> dict[str, str]:
    out: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = str(node)[:250]  # MLflow's limit for a parameter value

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    out.pop("training.resume", None)  # differs between a run and its resumption; a param cannot change
    return out


class Tracker:
    """The open runs of one job (rank 0)."""

    def __init__(self, cfg: DictConfig, job_dir: Path) -> None:
        self.cfg, self.job_dir = cfg, Path(job_dir)
        self.wandb = self.mlflow = None
        self.finished = False
        known = self._known_runs()
        if job_run() is not None:  # the job's own run, whatever `logger` says
            self._start_job_run(*job_run())
        elif cfg.logger.get("mlflow") is not None:
            self._start_mlflow(cfg.logger.mlflow, known.get("mlflow"))
        if cfg.logger.get("wandb") is not None:
            self._start_wandb(cfg.logger.wandb, known.get("wandb"))
        files.write_json(self.job_dir / RUNS_FILE, {k: v for k, v in self.run_ids().items() if v})
        atexit.register(self._abort)  # after mlflow's own hook, so this one runs first

    def _known_runs(self) -> dict:
        path = self.job_dir / RUNS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def run_ids(self) -> dict:
        return {"mlflow": self.mlflow.active_run().info.run_id if self.mlflow else None,
                "wandb": self.wandb.run.id if self.wandb else None}

    def _start_mlflow(self, mcfg: DictConfig, run_id: str | None) -> None:
        import mlflow

        uri = mlflow_uri(mcfg, self.job_dir)
        mlflow.set_tracking_uri(uri)
        if run_id is None and "MLFLOW_RUN_ID" not in os.environ:  # Azure ML hands its job a run
            name = mcfg.get("experiment") or "nlpwf"
            if mlflow.get_experiment_by_name(name) is None and uri.startswith("sqlite:"):
                # Without a location, artifacts would go to ./mlruns wherever nlpwf was started.
                mlflow.create_experiment(name, artifact_location=(output_root(self.job_dir) / "mlartifacts").as_uri())
            mlflow.set_experiment(name)
        run = mlflow.start_run(run_id=run_id, run_name=run_name(self.job_dir),
                               tags={"nlpwf.job_dir": str(self.job_dir), "nlpwf.overrides": " ".join(overrides(self.job_dir))})
        if run_id is None:
            mlflow.log_dict(OmegaConf.to_container(self.cfg, resolve=True), "nlpwf_config.yaml")
            params = _flat(self.cfg)
            items = list(params.items())
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
                mlflow.log_params(dict(items[i:i + 100]))
        self.mlflow = mlflow
        log.info("mlflow: run %s in %s", run.info.run_id, uri if uri.startswith("sqlite:") else "the tracking server")

    def _start_job_run(self, uri: str, run_id: str) -> None:
        """The run Azure ML created for the job: reattached as it is (its name is the job's),
        given the overrides, the job dir and, once, the parameters."""
        import mlflow

        if self.cfg.logger.get("mlflow") is not None and self.cfg.logger.mlflow.get("tracking_uri"):
            log.info("mlflow: logger.mlflow.tracking_uri is not used inside an Azure ML job: metrics go to the job's run")
        mlflow.set_tracking_uri(uri)
        run = mlflow.start_run(run_id=run_id)  # no run_name: renaming would hide the job's name in Studio
        # transformers' MLflowCallback starts a run of its own (named after the job dir, which would
        # rename this one) when it sees MLFLOW_RUN_ID; without it, it reuses the active run.
        os.environ.pop("MLFLOW_RUN_ID", None)
        mlflow.set_tags({"nlpwf.job_dir": str(self.job_dir),
                         "nlpwf.overrides": " ".join(overrides(self.job_dir)) or "(none)"})
        if not run.data.params:  # a retried job reattaches to a run that has them (a param cannot change)
            mlflow.log_dict(OmegaConf.to_container(self.cfg, resolve=True), "nlpwf_config.yaml")
            items = list(_flat(self.cfg).items())
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
                mlflow.log_params(dict(items[i:i + 100]))
        self.mlflow = mlflow
        log.info("mlflow: logging into the job's run %s", run.info.run_id)

    def _start_wandb(self, wcfg: DictConfig, run_id: str | None) -> None:
        import wandb

        config = OmegaConf.to_container(self.cfg, resolve=True)
        config["overrides"] = overrides(self.job_dir)
        mode = wandb_mode()
        wandb.init(project=wcfg.get("project") or "nlpwf", entity=wcfg.get("entity"), group=wcfg.get("group"),
                   name=run_name(self.job_dir), config=config, dir=str(self.job_dir), mode=mode,
                   id=run_id, resume="allow" if run_id else None)
        self.wandb = wandb
        log.info("wandb: run %s (%s)", wandb.run.id, mode)

    def finish(self, result: dict, paths: list[Path]) -> None:
        """Final metrics and the job's files into each run, then close them."""
        numbers = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        present = [Path(f) for f in paths if f and Path(f).is_file()]
        if self.mlflow:
            self.mlflow.log_metrics({f"final/{k}": v for k, v in numbers.items()})
            for f in present:
                self.mlflow.log_artifact(str(f))
            self.mlflow.end_run()
        if self.wandb:
            self.wandb.run.summary.update({f"final/{k}": v for k, v in numbers.items()})
            for f in present:
                if f.suffix == ".png":
                    self.wandb.log({f.stem: self.wandb.Image(str(f))})
                self.wandb.save(str(f), base_path=str(f.parent), policy="now")
            self.wandb.finish()
        self.finished = True

    def _abort(self) -> None:
        if self.finished:
            return
        if self.mlflow and self.mlflow.active_run():
            self.mlflow.end_run(status="FAILED")
        if self.wandb and self.wandb.run:
            self.wandb.finish(exit_code=1)


def start(cfg: DictConfig, job_dir: Path, is_main: bool) -> Tracker | None:
    if not is_main or not report_to(cfg.logger):
        return None
    return Tracker(cfg, job_dir)
