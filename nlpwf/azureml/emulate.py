"""Run an Azure ML job on this machine, the way Azure ML runs it on its nodes, and no more kindly.

The job's own spec is read back from job.yaml (as the submission does). Then, as on Azure:
- each node gets its own freshly created working dir holding a copy of the code snapshot;
- each input is "mounted" at a path of its own: a copy in the emulation's scratch dir, never
  the original (read-only for ro_mount: files and folders lose their write bits), and the
  command sees that path through `${{inputs.NAME}}`;
- each named output is a folder of a local stand-in for the workspace's datastores
  (`hydra.launcher.emulate_datastore`, default <job dir>/azureml/datastore), at the path the
  job declares (azureml://datastores/NAME/paths/PATH -> <datastore>/NAME/PATH); an output with
  no declared path, which Azure puts under the job's own name, is <job dir>/azureml/named_outputs/
  OUTPUT. Each node sees it through a view of its own, as through its own blob mount
  (mountview): its writes reach the datastore at once, so a job started again on the same
  outputs finds its checkpoints, and other nodes see them `emulate_listing_delay_s` later;
- on those mounts chmod, chown, hard links, folder renames and nlpwf's own renames are refused
  (noderules: an audit hook in every node's Python, through a `python` first on their PATH);
- the job's command runs nodes x processes times, through a shell, with an allow-list of
  variables: those Azure ML's PyTorch distribution documents (MASTER_ADDR, MASTER_PORT,
  WORLD_SIZE, NODE_RANK, RANK, LOCAL_RANK, runtime.workers azureml=True), the MLflow ones of the
  run Azure creates for the job (MLFLOW_TRACKING_URI, MLFLOW_RUN_ID, MLFLOW_EXPERIMENT_ID,
  MLFLOW_EXPERIMENT_NAME: a real MLflow tracking server here, mlflowserver), the job's own
  environment variables, and PATH (the one exception: the image's `python` is this
  interpreter, behind the rules' `python`). Nothing else of this shell: no LOCAL_WORLD_SIZE, no
  OMP_NUM_THREADS but the job's, no HOME. MASTER_ADDR is on this machine's network interface,
  not loopback. The job's thread count is the VM's, not this machine's: set
  hydra.launcher.environment_variables.OMP_NUM_THREADS to emulate a big VM size on a small
  machine without oversubscribing it.
Then the results output is read from the datastore as a download of a finished Azure job
reads it, trusting only what its marker lists (results.files), collected into the job dir
(download.collect), and the task's return value is read from it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from nlpwf.azureml import job as azjob
from nlpwf.azureml import mlflowserver, mountview, noderules
from nlpwf.azureml.download import collect, task_return
from nlpwf.azureml.job import JobSpec
from nlpwf.errors import UserError
from nlpwf.results import files
from nlpwf.runtime.workers import raise_for_exit, run_workers

log = logging.getLogger(__name__)

SCRATCH_DIR = "emulate"      # <job dir>/azureml/emulate when hydra.launcher.emulate_dir is not set
DATASTORE_DIR = "datastore"  # <job dir>/azureml/datastore when hydra.launcher.emulate_datastore is not set
MOUNTS_DIR = "mounts"        # <scratch>/mounts/NAME: the inputs as the nodes see them
OUTPUTS_DIR = "named_outputs"  # <job dir>/azureml/named_outputs/NAME: outputs with no declared path
LISTING_DELAY_S = 30.0    # how late a node sees other nodes' new files in a shared output (emulate_listing_delay_s)
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # a Docker image's default PATH
_DATASTORE_URI = re.compile(r"^azureml://datastores/([^/]+)/paths/(.*)$")
_BINDING = re.compile(r"\$\{\{\s*(inputs|outputs)\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def scratch_dir(spec: JobSpec, settings: DictConfig) -> Path:
    """The parent of the nodes' working dirs: a new dir under emulate_dir, else one in the job
    dir itself, where the rest of the job's files are (and a failed job's dirs are looked for)."""
    if settings.get("emulate_dir"):
        base = Path(settings.emulate_dir)
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=base))
    scratch = spec.job_dir / azjob.AZURE_DIR / SCRATCH_DIR
    _remove(scratch)
    scratch.mkdir(parents=True)
    return scratch


def datastore_root(spec: JobSpec, settings: DictConfig) -> Path:
    if settings.get("emulate_datastore"):
        return Path(settings.emulate_datastore).expanduser().resolve()
    return spec.job_dir / azjob.AZURE_DIR / DATASTORE_DIR


def datastore_path(uri: str, root: Path) -> Path:
    m = _DATASTORE_URI.match(uri)
    if not m:
        raise UserError(f"{uri}: emulation reads only local paths and azureml://datastores/NAME/paths/PATH "
                        "(from hydra.launcher.emulate_datastore); a data asset exists only in the workspace")
    return root / m.group(1) / m.group(2).strip("/")


def mount_input(name: str, job_input, scratch: Path, root: Path) -> Path:
    """A copy of the input at a path of its own (read-only unless downloaded): what the nodes see."""
    path = str(job_input.path)
    source = datastore_path(path, root) if path.startswith("azureml:") else Path(path)
    if not source.exists():
        raise UserError(f"input {name}: {source} does not exist (the job's {path})")
    target = scratch / MOUNTS_DIR / name
    if source.is_dir():
        shutil.copytree(source, target)
        mounted = target
    else:
        target.mkdir(parents=True)
        mounted = target / source.name
        shutil.copy2(source, mounted)
    if str(getattr(job_input, "mode", None) or "ro_mount") != "download":
        _set_writable(target, False)
    return mounted


def output_path(name: str, job_output, spec: JobSpec, root: Path) -> Path:
    declared = getattr(job_output, "path", None)
    path = datastore_path(str(declared), root) if declared else spec.job_dir / azjob.AZURE_DIR / OUTPUTS_DIR / name
    if not declared:
        _remove(path)  # a new job's own output starts empty
    path.mkdir(parents=True, exist_ok=True)
    return path


def bind(command: str, bound: dict[tuple[str, str], str]) -> str:
    """The command with ${{inputs.NAME}} / ${{outputs.NAME}} replaced (by shell words), as Azure
    ML does on a node."""
    def one(m: re.Match) -> str:
        if (m.group(1), m.group(2)) not in bound:
            raise UserError(f"the job's command refers to {m.group(0)}, which the job does not declare")
        return bound[(m.group(1), m.group(2))]
    return _BINDING.sub(one, command)


def node_python(scratch: Path, mounts: list[Path]) -> Path:
    """A folder with the nodes' `python`: this interpreter, under the output mount rules (noderules)."""
    folder = scratch / "bin"
    folder.mkdir(parents=True, exist_ok=True)
    rules = folder / "mount_rules.json"
    rules.write_text(json.dumps({"mounts": [str(m) for m in mounts]}))
    script = f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(noderules.__file__)} {shlex.quote(str(rules))} \"$@\"\n"
    for name in ("python", "python3"):
        (folder / name).write_text(script)
        (folder / name).chmod(0o755)
    return folder


def node_env(job, python_dir: Path, tracking: dict[str, str]) -> dict[str, str]:
    """What every process starts with besides its rank's contract: the job's variables, the
    tracking run's and PATH (see the module's docstring)."""
    return {**{k: str(v) for k, v in (job.environment_variables or {}).items()}, **tracking,
            "PATH": os.pathsep.join([str(python_dir), str(Path(sys.executable).parent), IMAGE_PATH])}


def start_tracking(spec: JobSpec, job, settings: DictConfig) -> tuple[mlflowserver.Server | None, dict[str, str]]:
    srv = mlflowserver.server(settings.get("emulate_tracking_dir"))
    if srv is None:
        return None, {}
    return srv, mlflowserver.job_run(srv, job.experiment_name or "Default", spec.name, job.display_name)


def prepare_nodes(spec: JobSpec, settings: DictConfig, job, scratch: Path) -> tuple[str, mountview.Syncer]:
    """The nodes' working dirs and mounts: the command as the nodes run it, and the outputs' views."""
    root = datastore_root(spec, settings)
    nodes = job.resources.instance_count
    for node in range(nodes):  # every node gets its own fresh copy of the code, as on Azure
        shutil.copytree(job.code, scratch / f"node-{node}")
    bound: dict[tuple[str, str], str] = {}
    for name, job_input in (job.inputs or {}).items():
        bound[("inputs", name)] = shlex.quote(str(mount_input(name, job_input, scratch, root)))
    stores = {name: output_path(name, job_output, spec, root) for name, job_output in (job.outputs or {}).items()}
    syncer = mountview.Syncer(stores, scratch, nodes, float(settings.get("emulate_listing_delay_s") or LISTING_DELAY_S))
    for name in stores:
        bound[("outputs", name)] = syncer.view_binding(name)
    return bind(job.command, bound), syncer


def run(spec: JobSpec, settings: DictConfig) -> Any:
    """Emulate the job; returns the task's return value (rank 0's). A failing process fails the
    job: the exception raise_for_exit makes of its exit code."""
    job = azjob.load(spec.job_yaml)
    nodes, procs = job.resources.instance_count, job.distribution.process_count_per_instance
    scratch = scratch_dir(spec, settings)
    command, syncer = prepare_nodes(spec, settings, job, scratch)
    srv, tracking = start_tracking(spec, job, settings)
    env = node_env(job, node_python(scratch, syncer.mount_paths()), tracking)
    log.info("emulating Azure ML job %s here: %d node(s) x %d process(es), %s thread(s) each, in %s/node-N; "
             "outputs in %s", spec.name, nodes, procs, env.get("OMP_NUM_THREADS", "torch's default"), scratch,
             datastore_root(spec, settings))
    # A shell enters the rank's node dir (NODE_RANK is in the contract) and runs the job's command verbatim.
    in_node_dir = ["/bin/sh", "-c", 'cd "node-$NODE_RANK" && exec /bin/sh -c "$1"', "sh", command]
    code = None
    syncer.start()
    try:
        code = run_workers(in_node_dir, nodes, procs, cwd=scratch, extra_env=env, azureml=True)
    finally:
        syncer.stop()
        if srv is not None:
            mlflowserver.end_run(srv, tracking["MLFLOW_RUN_ID"], code == 0)
    if code == UserError.exit_code and not settings.get("emulate_dir"):
        _remove(scratch)  # nothing to inspect: the job's message above says what to fix
    raise_for_exit(code, f"the emulated Azure ML job {spec.name}",
                   f"its nodes' working dirs are kept in {scratch}; its outputs are in {datastore_root(spec, settings)}")
    download = scratch / "download" / azjob.RESULTS_OUTPUT
    files.copy_listed(syncer.outputs[azjob.RESULTS_OUTPUT].store, download)  # a download trusts the marker's list only
    collect(download, spec.job_dir)
    value = task_return(spec.job_dir, f"the emulated Azure ML job {spec.name}")
    if not settings.get("emulate_dir"):  # a dir the user chose is theirs to inspect
        _remove(scratch)
    return value


def _set_writable(path: Path, writable: bool) -> None:
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in sorted(paths, key=lambda p: len(p.parts), reverse=writable is False):
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
        os.chmod(p, (mode | stat.S_IWUSR) if writable else (mode & ~bits))


def _remove(scratch: Path) -> None:
    mounts = scratch / MOUNTS_DIR
    if mounts.exists():
        _set_writable(mounts, True)
    shutil.rmtree(scratch, ignore_errors=True)
