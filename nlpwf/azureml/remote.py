"""The command of every Azure ML job nlpwf submits: `python -m nlpwf.azureml.remote nlpwf_job.pkl`,
run by each process Azure ML starts, in the job's code snapshot.

It restores Hydra's state from the payload (payload.py) and runs the user's task function
through Hydra's run_job, as Hydra's remote launchers do on their workers. Every process of the
job runs it (Azure's PyTorch distribution starts processes_per_node of them on each node,
each with the env contract: RANK, WORLD_SIZE, ...) and writes no `.hydra/`. Rank 0 leaves the
task's return value in its run dir for the launcher.

The command's further arguments are `key=value` overrides the launcher put there because only
Azure knows their values when the job starts: the mounted paths of the job's inputs
(`dataset.data_dir=${{inputs.dataset_data_dir}}`, azureml.inputs), the run dir on the `results`
output and the checkpoint dir on the `checkpoints` output (azureml.job). They are set in the
payload's config before run_job, as plain values.

The outputs are blob mounts, which take plain writes only (results.files), so the task does
not run in the `results` output: each process's run dir is a folder of its own on the node's
disk (LOCAL_RUNS in the working dir), where the task writes as it would on any disk (renames
included), and Hydra's log goes there too. When the task ends, rank 0 copies its finished run
dir into the `results` output with a marker last (files.publish); every other rank copies only
its log, to logs/NAME.rank-N.log, so that rank 0's log is the one at the top, where a local
job's is. A failed task publishes its log only. Checkpoints are written straight into the
`checkpoints` output by training (training.checkpoints), which knows nothing of this.

The exit code is the job's outcome, which is all Azure ML sees: run_job turns a task's
exception into a failed JobReturn, so a failed job exits 1 here (after its traceback); a
SystemExit of the task (nlpwf's task exits 2 on bad input) passes through unchanged.
"""
from __future__ import annotations

import logging
import shutil
import sys
import traceback
from pathlib import Path

from hydra.core.utils import JobStatus, run_job
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from nlpwf.azureml import payload
from nlpwf.results import files
from nlpwf.runtime import contract

LOCAL_RUNS = ".nlpwf_runs"  # in the node's working dir: rank-N/, each process's run dir on the node's own disk
LOGS_DIR = "logs"           # in the results output: the other ranks' logs, NAME.rank-N.log


def apply_overrides(config: DictConfig, overrides: list[str]) -> None:
    """`key=value` of the command into the job's config (values as strings: paths and words)."""
    with read_write(config), open_dict(config):
        for item in overrides:
            key, _, value = item.partition("=")
            with read_write(config.hydra), open_dict(config.hydra):
                OmegaConf.update(config, key, value, merge=False, force_add=True)


def local_run_dir(config: DictConfig, rank: contract.Rank) -> Path | None:
    """When the command put the run dir on the job's `results` output, point it at this
    process's own empty folder on the node's disk instead; returns the output, to publish to."""
    output = OmegaConf.select(config, "hydra.run.dir")
    if output in (None, payload.REMOTE_RUN_DIR):  # ./outputs: uploaded by Azure at the end, not a mount
        return None
    local = Path.cwd() / LOCAL_RUNS / f"rank-{rank.rank}"
    shutil.rmtree(local, ignore_errors=True)  # an earlier attempt's files are not this one's results
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.run.dir = str(local)
    return Path(str(output))


def publish(local: Path, output: Path, rank: contract.Rank, completed: bool) -> None:
    """Rank 0's finished run dir into the results output (its marker last); its log alone when the
    task failed; every other rank's log as logs/NAME.rank-N.log."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    logs = sorted(p.name for p in local.glob("*.log")) if local.is_dir() else []
    if rank.is_main and completed:
        files.publish(local, output)
    elif rank.is_main:
        for name in logs:
            files.copy_file(local / name, output / name)
    else:
        for name in logs:
            files.copy_file(local / name, output / LOGS_DIR / f"{Path(name).stem}.rank-{rank.rank}.log")


def main(argv: list[str]) -> int:
    if not argv or any("=" not in a for a in argv[1:]):
        print(f"usage: python -m nlpwf.azureml.remote {payload.PAYLOAD_FILE} [key=value ...]", file=sys.stderr)
        return 2
    job = payload.read(Path(argv[0]))
    apply_overrides(job.config, argv[1:])
    payload.restore(job)
    rank = contract.from_env() or contract.Rank()
    output = local_run_dir(job.config, rank)
    ret = None
    try:
        # run_job reads only the callbacks of its context: the config loader is the launcher's business.
        ret = run_job(hydra_context=HydraContext(config_loader=None, callbacks=job.callbacks),
                      task_function=job.task_function(), config=job.config,
                      job_dir_key="hydra.run.dir", job_subdir_key=None)
        if ret.status == JobStatus.COMPLETED and rank.is_main:
            payload.write_return(Path(ret.hydra_cfg.hydra.runtime.output_dir) / payload.RETURN_FILE, ret.return_value)
    finally:
        if output is not None:
            publish(Path(job.config.hydra.run.dir), output, rank, ret is not None and ret.status == JobStatus.COMPLETED)
    if ret.status != JobStatus.COMPLETED:
        try:
            ret.return_value  # noqa: B018 - Hydra's accessor: names the job's overrides, then raises the task's exception
        except Exception:  # noqa: BLE001 - any exception of the task fails the job
            traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
