"""`python -m nlpwf` / `nlpwf`: the Hydra entry. Runs the job's stage here and maps nlpwf's
errors to one line and an exit code. Where a job runs is the launcher's business
(launchers/hydra_plugins): this task only ever runs one. Nothing imports this module.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from nlpwf import CONF_DIR, stages
from nlpwf.config.storage import storage_problem
from nlpwf.errors import JobFailed, UserError
from nlpwf.runtime import console, contract


def _quiet_third_party() -> None:
    # torchao (pulled in by Neural Compressor) warns on import about GPU kernels a CPU never uses.
    for name in ("torchao", "torchao.kernel.intmm"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run(cfg: DictConfig, job_dir: Path) -> float | None:
    _quiet_third_party()
    console.setup()  # no carriage-return progress bars in log files
    rank = contract.from_env()
    console.show_config(cfg, rank.rank if rank else None)
    result = stages.run(cfg, job_dir)
    return None if result is None else result.get(cfg.objective)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return run(cfg, job_dir)
    except (UserError, JobFailed) as e:
        print(f"nlpwf: error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except Exception as e:  # a full or read-only disk found mid-run: one line too
        problem = storage_problem(e, job_dir)
        if problem is None:
            raise
        print(f"nlpwf: error: {problem}", file=sys.stderr, flush=True)
        sys.exit(UserError.exit_code)
