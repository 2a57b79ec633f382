"""Run an Azure ML job on this machine, the way Azure ML runs it on its nodes.

The job's own spec is read back from job.yaml (as the submission does); its snapshot is
copied once per node into a scratch dir, and each node's copy is the working dir of that
node's processes; the job's command runs nodes × processes times, through a shell, with the
env contract Azure ML's PyTorch distribution sets plus the job's environment variables. OMP threads are scaled to this
machine (a 32-vCPU VM size does not fit here). Then the outputs are collected into the job
dir exactly as a download of a finished Azure job is (submit.collect).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from nlpwf import distributed, outputs
from nlpwf.azureml import job as azjob
from nlpwf.azureml.job import JobSpec
from nlpwf.azureml.submit import collect
from nlpwf.errors import UserError

log = logging.getLogger(__name__)


def scratch_dir(spec: JobSpec, settings: DictConfig) -> Path:
    base = Path(settings.emulate_dir) if settings.get("emulate_dir") else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=base))


def run(spec: JobSpec, settings: DictConfig) -> dict:
    """Emulate the job; returns rank 0's metrics. A failing process fails the job."""
    job = azjob.load(spec.job_yaml)
    nodes = job.resources.instance_count
    procs = job.distribution.process_count_per_instance
    scratch = scratch_dir(spec, settings)
    for node in range(nodes):  # every node gets its own copy of the code, as on Azure
        shutil.copytree(job.code, scratch / f"node-{node}")
    # The image's `python` is this interpreter here: put it first on PATH, change nothing else.
    env = {**{k: str(v) for k, v in (job.environment_variables or {}).items()},
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    threads = distributed.threads_per_process(None, nodes * procs)
    log.info("emulating Azure ML job %s here: %d node(s) x %d process(es), %d thread(s) each, in %s/node-N",
             spec.name, nodes, procs, threads, scratch)
    # A shell enters the rank's node dir (NODE_RANK is in the contract) and runs the job's command verbatim.
    in_node_dir = ["/bin/sh", "-c", 'cd "node-$NODE_RANK" && exec /bin/sh -c "$1"', "sh", job.command]
    code = distributed.run_workers(in_node_dir, nodes, procs, cwd=scratch, extra_env=env, threads=threads)
    if code == UserError.exit_code:
        _remove(scratch, settings)  # nothing to inspect: the message above says what to fix
        raise UserError(f"the emulated job {spec.name} rejected its input (its message is above): fix it and run again")
    if code != 0:
        raise RuntimeError(f"the emulated Azure ML job {spec.name} failed (exit code {code}); its log is above, "
                           f"its nodes' working dirs are kept in {scratch}")
    metrics = collect(scratch / "node-0" / azjob.REMOTE_RUN_DIR, spec.job_dir)  # rank 0 runs on node 0
    _remove(scratch, settings)
    if metrics is None:
        raise RuntimeError(f"the emulated job {spec.name} finished but wrote no {outputs.METRICS_FILE}")
    return metrics


def _remove(scratch: Path, settings: DictConfig) -> None:
    if not settings.get("emulate_dir"):  # a dir the user chose is theirs to inspect
        shutil.rmtree(scratch, ignore_errors=True)
