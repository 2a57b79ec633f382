"""Run an Azure ML job on this machine, the way Azure ML runs it on its nodes.

The job's own spec is read back from job.yaml (as the submission does); its snapshot is
copied once per node into a scratch dir, and each node's copy is the working dir of that
node's processes; the job's command runs nodes x processes times, through a shell, with the
env contract Azure ML's PyTorch distribution sets plus the job's environment variables. OMP
threads are scaled to this machine (a 32-vCPU VM size does not fit here). Then the outputs
are collected into the job dir exactly as a download of a finished Azure job is
(submit.collect), and the task's return value is read from them.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from nlpwf.azureml import job as azjob
from nlpwf.azureml import payload
from nlpwf.azureml.job import JobSpec
from nlpwf.azureml.submit import collect, task_return
from nlpwf.errors import UserError
from nlpwf.runtime.threads import threads_per_process
from nlpwf.runtime.workers import raise_for_exit, run_workers

log = logging.getLogger(__name__)

SCRATCH_DIR = "emulate"  # <job dir>/azureml/emulate when hydra.launcher.emulate_dir is not set


def scratch_dir(spec: JobSpec, settings: DictConfig) -> Path:
    """The parent of the nodes' working dirs: a new dir under emulate_dir, else one in the job
    dir itself, where the rest of the job's files are (and a failed job's dirs are looked for)."""
    if settings.get("emulate_dir"):
        base = Path(settings.emulate_dir)
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=base))
    scratch = spec.job_dir / azjob.AZURE_DIR / SCRATCH_DIR
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    return scratch


def run(spec: JobSpec, settings: DictConfig) -> Any:
    """Emulate the job; returns the task's return value (rank 0's). A failing process fails the
    job: the exception raise_for_exit makes of its exit code."""
    job = azjob.load(spec.job_yaml)
    nodes = job.resources.instance_count
    procs = job.distribution.process_count_per_instance
    scratch = scratch_dir(spec, settings)
    for node in range(nodes):  # every node gets its own copy of the code, as on Azure
        shutil.copytree(job.code, scratch / f"node-{node}")
    # The image's `python` is this interpreter here: put it first on PATH, change nothing else.
    env = {**{k: str(v) for k, v in (job.environment_variables or {}).items()},
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    threads = threads_per_process(None, nodes * procs)  # every emulated node shares this machine
    log.info("emulating Azure ML job %s here: %d node(s) x %d process(es), %d thread(s) each, in %s/node-N",
             spec.name, nodes, procs, threads, scratch)
    # A shell enters the rank's node dir (NODE_RANK is in the contract) and runs the job's command verbatim.
    in_node_dir = ["/bin/sh", "-c", 'cd "node-$NODE_RANK" && exec /bin/sh -c "$1"', "sh", job.command]
    code = run_workers(in_node_dir, nodes, procs, cwd=scratch, extra_env=env, threads=threads)
    if code == UserError.exit_code and not settings.get("emulate_dir"):
        _remove(scratch)  # nothing to inspect: the job's message above says what to fix
    raise_for_exit(code, f"the emulated Azure ML job {spec.name}", f"its nodes' working dirs are kept in {scratch}")
    remote_outputs = scratch / "node-0" / payload.REMOTE_RUN_DIR  # rank 0 runs on node 0
    collect(remote_outputs, spec.job_dir)
    value = task_return(spec.job_dir, f"the emulated Azure ML job {spec.name}")
    if not settings.get("emulate_dir"):  # a dir the user chose is theirs to inspect
        _remove(scratch)
    return value


def _remove(scratch: Path) -> None:
    shutil.rmtree(scratch, ignore_errors=True)
