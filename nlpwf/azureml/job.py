"""Build one Azure ML command job from a job's resolved config.

The job re-enters `python -m nlpwf` on every process Azure ML starts, with the config
resolved here (so `${now:}` and resolvers are evaluated once, on this machine) and a run
dir pinned under ./outputs, the folder Azure ML uploads as the job's outputs. Azure ML
itself sets the distributed env contract; there is no torchrun in the command.
"""
from __future__ import annotations

import functools
import logging
import re
import secrets
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nlpwf import PROJECT_ROOT, cli
from nlpwf.azureml import snapshot, workspace
from nlpwf.errors import UserError

log = logging.getLogger(__name__)

AZURE_DIR = "azureml"          # in the job dir: job.yaml and the code snapshot
JOB_YAML = "job.yaml"
SNAPSHOT_DIR = "snapshot"
REMOTE_RUN_DIR = "outputs"     # Azure ML uploads ./outputs of the working dir (the code dir)
# Inputs that may name a local folder: the snapshot carries code, not data or weights.
LOCAL_INPUTS = ("dataset.data_dir", "model.source", "model.tokenizer")
CLUSTER_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9-]{1,15}$")  # AmlCompute's naming rule


@dataclass
class JobSpec:
    name: str
    job_dir: Path
    job_yaml: Path
    snapshot_dir: Path
    command: str
    nodes: int
    processes_per_node: int
    environment_variables: dict[str, str]
    cluster: dict = field(default_factory=dict)


def layout(cfg: DictConfig) -> tuple[int, int]:
    """(instance_count, process_count_per_instance). Only training is distributed (as locally, see cli.run)."""
    if cfg.stage.name != "train":
        return 1, 1
    return int(cfg.nodes), int(cfg.compute.processes_per_node)


def threads_per_process(cfg: DictConfig) -> int:
    """OMP threads on the VM: the option's value, else its physical cores shared out."""
    configured = cfg.compute.get("threads_per_process")
    if configured:
        return int(configured)
    return max(1, int(cfg.compute.cores) // max(1, int(cfg.compute.processes_per_node)))


def validate(cfg: DictConfig, settings: DictConfig, sweeper_target: str | None) -> None:
    """What Azure would reject late (or never): each a one-line error naming the fix."""
    if cfg.nodes < 1:
        raise UserError(f"nodes={cfg.nodes}: an Azure ML job needs at least one node, e.g. nodes=2")
    if cfg.compute.processes_per_node < 1:
        raise UserError(f"compute.processes_per_node={cfg.compute.processes_per_node}: use 1 or more")
    cluster = OmegaConf.select(cfg, "compute.cluster", default=None)
    if cluster is None or not cluster.get("name"):
        raise UserError(f"compute={cfg.compute.name} names no Azure ML cluster: choose an Azure option "
                        "(compute=d32_v5 or compute=d32s_v6) or set compute.cluster.name")
    if not CLUSTER_NAME.match(str(cluster.name)):
        raise UserError(f"compute.cluster.name={cluster.name} is not a valid AmlCompute name: "
                        "use 2-16 letters, digits or hyphens, starting with a letter")
    if cluster.get("max_instances") is not None and cfg.nodes > cluster.max_instances:
        raise UserError(f"nodes={cfg.nodes} is above compute.cluster.max_instances={cluster.max_instances}: "
                        f"lower nodes or set compute.cluster.max_instances={cfg.nodes}")
    if cfg.compute.get("cores") is None and not cfg.compute.get("threads_per_process"):
        raise UserError(f"compute={cfg.compute.name} has no cores count: set compute.cores (physical cores per VM)")
    for key in LOCAL_INPUTS:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, str) and not value.startswith("package:") and Path(value).expanduser().exists():
            raise UserError(f"{key}={value} is a folder on this machine, which the Azure ML job cannot read: "
                            "use a Hub id, or a path that exists on the nodes (e.g. a mounted datastore)")
    if not settings.environment.image:
        docker_context(settings)  # raises when missing
    if not (settings.dry_run or settings.emulate):
        if not settings.wait and sweeper_target and not sweeper_target.endswith("BasicSweeper"):
            raise UserError("this sweeper needs each job's result: add hydra.launcher.wait=true")
        workspace.check(settings.workspace)


def docker_context(settings: DictConfig) -> Path:
    path = Path(settings.environment.docker_context)
    path = path if path.is_absolute() else PROJECT_ROOT / path
    if not (path / "Dockerfile").is_file():
        raise UserError(f"no Dockerfile in the docker build context {path}: set hydra.launcher.environment.docker_context "
                        "to a folder with one, or hydra.launcher.environment.image to a ready image")
    return path


def job_name(num: int) -> str:
    """Unique in the workspace, readable in Studio, and known before submitting (for retries and logs)."""
    return f"nlpwf-{time.strftime('%Y%m%d-%H%M%S')}-{num}-{secrets.token_hex(3)}"


def _shell_join(argv: list[str]) -> str:
    # Hydra overrides quote values with '...': wrap those in "..." so the command stays readable in Studio.
    def one(a: str) -> str:
        if a == shlex.quote(a):
            return a
        return f'"{a}"' if not re.search(r'["$`\\!]', a) else shlex.quote(a)

    return " ".join(one(a) for a in argv)


def remote_command() -> str:
    """cli.worker_command, as run in the code dir on every node. Its --config-path would be read
    relative to the nlpwf package; the config sits in the working dir, which --config-dir is relative to."""
    argv = cli.worker_command(Path(cli.JOB_CONFIG), REMOTE_RUN_DIR, python="python")
    argv = [f"--config-dir=." if a.startswith("--config-path=") else a for a in argv]
    return _shell_join(argv)


def environment_variables(cfg: DictConfig, settings: DictConfig) -> dict[str, str]:
    env = {
        "OMP_NUM_THREADS": str(threads_per_process(cfg)),
        "TOKENIZERS_PARALLELISM": "false",  # its thread pool would compete with the OMP threads of the ranks
        "HYDRA_FULL_ERROR": "1",            # a failing job's log then has the whole traceback
    }
    env.update({str(k): str(v) for k, v in (settings.environment_variables or {}).items()})
    return env


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str, bool]:
    """(commit, dirty) of the project, or ("unknown", False) outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", False
    if commit.returncode != 0:
        return "unknown", False
    return commit.stdout.strip(), bool(status.stdout.strip())


def tags(hydra_cfg: DictConfig) -> dict[str, str]:
    commit, dirty = git_state()
    return {
        "overrides": " ".join(hydra_cfg.overrides.task) or "(none)",
        "job_num": str(hydra_cfg.job.num),
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
    }


def display_name(cfg: DictConfig, hydra_cfg: DictConfig) -> str:
    experiment = hydra_cfg.runtime.choices.get("experiment") or cfg.stage.name
    nodes, procs = layout(cfg)
    return f"{experiment}-{cfg.compute.name}-{nodes}x{procs}-{hydra_cfg.job.num}"


def command_job(spec: JobSpec, cfg: DictConfig, settings: DictConfig, hydra_cfg: DictConfig, code, environment):
    """The SDK's CommandJob. `code` and `environment` are paths/objects or ARM ids."""
    from azure.ai.ml import PyTorchDistribution
    from azure.ai.ml.entities import CommandJob, JobResourceConfiguration

    return CommandJob(
        name=spec.name,
        display_name=display_name(cfg, hydra_cfg),
        experiment_name=settings.experiment_name,
        tags=tags(hydra_cfg),
        code=code,
        command=spec.command,
        environment=environment,
        environment_variables=spec.environment_variables,
        compute=spec.cluster["name"],
        resources=JobResourceConfiguration(instance_count=spec.nodes),
        distribution=PyTorchDistribution(process_count_per_instance=spec.processes_per_node),
    )


def environment(settings: DictConfig):
    """The training environment: a ready image, or an anonymous one Azure builds from docker/
    (registered by content hash, so it is rebuilt only when docker/ changes)."""
    from azure.ai.ml.entities import BuildContext, Environment

    if settings.environment.image:
        return Environment(image=settings.environment.image)
    return Environment(build=BuildContext(path=str(docker_context(settings))))


def prepare(cfg: DictConfig, job_dir: Path, settings: DictConfig, hydra_cfg: DictConfig) -> JobSpec:
    """Validate, snapshot the code with the resolved config, and write <job dir>/azureml/job.yaml
    (loadable by azure.ai.ml.load_job; what is submitted is that file, loaded back)."""
    validate(cfg, settings, OmegaConf.select(hydra_cfg, "sweeper._target_"))
    azure_dir = job_dir / AZURE_DIR
    snap = snapshot.build(azure_dir / SNAPSHOT_DIR, max_file_mb=settings.snapshot_max_file_mb)
    cli.write_job_config(cfg, snap / cli.JOB_CONFIG)
    nodes, procs = layout(cfg)
    spec = JobSpec(
        name=job_name(hydra_cfg.job.num), job_dir=job_dir, job_yaml=azure_dir / JOB_YAML, snapshot_dir=snap,
        command=remote_command(), nodes=nodes, processes_per_node=procs,
        environment_variables=environment_variables(cfg, settings),
        cluster=OmegaConf.to_container(cfg.compute.cluster, resolve=True),
    )
    job = command_job(spec, cfg, settings, hydra_cfg, code=str(snap), environment=environment(settings))
    _quiet_sdk()
    job.dump(str(spec.job_yaml))
    load(spec.job_yaml)  # the SDK's own client-side validation, on exactly what will be sent
    log.info("Azure ML job %s: %d node(s) x %d process(es) on cluster %s, spec %s",
             spec.name, nodes, procs, spec.cluster["name"], spec.job_yaml)
    return spec


def load(job_yaml: Path):
    """The job as submitted: the dumped spec, loaded back by the SDK (which validates it)."""
    from azure.ai.ml import load_job

    _quiet_sdk()
    return load_job(str(job_yaml))


def _quiet_sdk() -> None:
    # The SDK warns about its experimental schema classes on every load; nothing for a user to act on.
    import warnings

    warnings.filterwarnings("ignore", module=r"azure\.ai\.ml")
    warnings.filterwarnings("ignore", module=r"marshmallow")
    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)
    for name in ("azure.identity", "azure.core.pipeline.policies.http_logging_policy"):
        logging.getLogger(name).setLevel(logging.WARNING)
