"""`python -m nlpwf` / `nlpwf`: the Hydra entrypoint.

The task function runs one job. A job of one process trains here; a job of several
processes (nodes × compute.processes_per_node) starts them as workers on this machine, each
re-entering this same entrypoint with the job's resolved config and the env contract of
distributed.py, exactly as Azure ML starts them on its nodes.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from nlpwf import CONF_DIR, console, distributed, outputs, stages
from nlpwf.errors import Interrupted, JobFailed, UserError

log = logging.getLogger("nlpwf")

JOB_CONFIG = "nlpwf_job.yaml"


def write_job_config(cfg: DictConfig, path: Path) -> Path:
    """The job's fully resolved config: what every worker, local or remote, runs from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def worker_command(config_file: Path | str, run_dir: Path | str, python: str = sys.executable) -> list[str]:
    """Re-enter the CLI with a job's resolved config. The run dir is pinned: several
    processes (and a remote node) must agree on it, and `${now:}` would not."""
    config_file = Path(config_file)
    return [
        python, "-m", "nlpwf",
        f"--config-path={config_file.parent}", f"--config-name={config_file.stem}",
        f"hydra.run.dir={_quote(str(run_dir))}", "hydra.output_subdir=null", "hydra.job.name=nlpwf",
    ]


def run_local_workers(cfg: DictConfig, job_dir: Path) -> dict:
    world = cfg.nodes * cfg.compute.processes_per_node
    # An Azure VM size emulated here keeps its process layout but not its thread count.
    configured = cfg.compute.threads_per_process if cfg.compute.name == "local" else None
    threads = distributed.threads_per_process(configured, world)
    config_file = write_job_config(cfg, job_dir / JOB_CONFIG)
    code = distributed.run_workers(worker_command(config_file, job_dir), cfg.nodes, cfg.compute.processes_per_node, threads=threads)
    if code == UserError.exit_code:
        raise UserError("a worker rejected the job's input (its message is above): fix it and run again")
    if code != 0:
        from nlpwf import checkpoints, faults

        hint = faults.resume_hint(job_dir / checkpoints.CHECKPOINT_DIR, job_dir)
        if code == Interrupted.exit_code:
            raise Interrupted(f"training stopped by SIGTERM; {hint}")
        raise JobFailed(f"a worker process {distributed.describe_exit(code)} (the 'rank N' lines above say which and why); {hint}")
    metrics = outputs.read_metrics(job_dir)
    if metrics is None:
        raise RuntimeError(f"the workers finished but rank 0 wrote no {outputs.METRICS_FILE} in {job_dir}")
    return metrics


def _quiet_third_party() -> None:
    # torchao (pulled in by Neural Compressor) warns on import about GPU kernels a CPU never uses.
    for name in ("torchao", "torchao.kernel.intmm"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run(cfg: DictConfig) -> float | None:
    _quiet_third_party()
    console.setup()  # no carriage-return progress bars in log files
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    stage = stages.get(cfg.stage.name)
    if distributed.from_env() is not None:  # one rank of a job someone else started
        console.show_config(cfg, distributed.from_env().rank)
        result = stage(cfg, job_dir)
    else:
        console.show_config(cfg, None)
        stages.check(cfg)
        from nlpwf import azureml

        if azureml.selected():  # under the Azure ML launcher the job is built and sent there (nlpwf/azureml)
            return azureml.run(cfg, job_dir)
        if cfg.nodes * cfg.compute.processes_per_node > 1 and cfg.stage.name == "train":
            from nlpwf import train

            train.preflight(cfg)
            result = run_local_workers(cfg, job_dir)
        else:
            result = stage(cfg, job_dir)
    if result is None:
        return None
    return result.get(cfg.objective)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        return run(cfg)
    except (UserError, JobFailed) as e:
        print(f"nlpwf: error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except Exception as e:  # a full or read-only disk found mid-run: one line too
        from nlpwf import validate

        problem = validate.storage_problem(e, Path(HydraConfig.get().runtime.output_dir))
        if problem is None:
            raise
        print(f"nlpwf: error: {problem}", file=sys.stderr, flush=True)
        sys.exit(UserError.exit_code)
