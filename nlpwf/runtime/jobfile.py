"""A job's resolved config as a file, and the command that re-enters nlpwf with it.

Every process that is not the one the user started (a local worker, an Azure ML node) runs
`python -m nlpwf` with this file: `${now:}` and resolvers are evaluated once, by the process
that wrote it, so all processes agree on every value.
"""
from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

JOB_CONFIG = "nlpwf_job.yaml"


def write_job_config(cfg: DictConfig, path: Path) -> Path:
    """The job's fully resolved config: what every worker, local or remote, runs from."""
    path = Path(path)
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
