"""The command of every Azure ML job nlpwf submits: `python -m nlpwf.azureml.remote nlpwf_job.pkl`,
run by each process Azure ML starts, in the job's code snapshot.

It restores Hydra's state from the payload (payload.py) and runs the user's task function
through Hydra's run_job, as Hydra's remote launchers do on their workers. Every process of the
job runs it (Azure's PyTorch distribution starts processes_per_node of them on each node,
each with the env contract: RANK, WORLD_SIZE, ...); they share the pinned run dir ./outputs
and write no `.hydra/`. Rank 0 leaves the task's return value there for the launcher.

The command's further arguments are `key=value` overrides the launcher put there because only
Azure knows their values when the job starts: the mounted paths of the job's inputs
(`dataset.data_dir=${{inputs.dataset_data_dir}}`, azureml.inputs), the run dir on the `results`
output and the checkpoint dir on the `checkpoints` output (azureml.job). They are set in the
payload's config before run_job, as plain values.

The exit code is the job's outcome, which is all Azure ML sees: run_job turns a task's
exception into a failed JobReturn, so a failed job exits 1 here (after its traceback); a
SystemExit of the task (nlpwf's task exits 2 on bad input) passes through unchanged.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

from hydra.core.utils import JobStatus, run_job
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from nlpwf.azureml import payload
from nlpwf.runtime import contract


def apply_overrides(config: DictConfig, overrides: list[str]) -> None:
    """`key=value` of the command into the job's config (values as strings: paths and words)."""
    with read_write(config), open_dict(config):
        for item in overrides:
            key, _, value = item.partition("=")
            with read_write(config.hydra), open_dict(config.hydra):
                OmegaConf.update(config, key, value, merge=False, force_add=True)


def main(argv: list[str]) -> int:
    if not argv or any("=" not in a for a in argv[1:]):
        print(f"usage: python -m nlpwf.azureml.remote {payload.PAYLOAD_FILE} [key=value ...]", file=sys.stderr)
        return 2
    job = payload.read(Path(argv[0]))
    apply_overrides(job.config, argv[1:])
    payload.restore(job)
    # run_job reads only the callbacks of its context: the config loader is the launcher's business.
    ret = run_job(hydra_context=HydraContext(config_loader=None, callbacks=job.callbacks),
                  task_function=job.task_function(), config=job.config,
                  job_dir_key="hydra.run.dir", job_subdir_key=None)
    if ret.status != JobStatus.COMPLETED:
        try:
            ret.return_value  # noqa: B018 - Hydra's accessor: names the job's overrides, then raises the task's exception
        except Exception:  # noqa: BLE001 - any exception of the task fails the job
            traceback.print_exc()
        return 1
    rank = contract.from_env()
    if rank is None or rank.is_main:
        payload.write_return(Path(ret.hydra_cfg.hydra.runtime.output_dir) / payload.RETURN_FILE, ret.return_value)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
