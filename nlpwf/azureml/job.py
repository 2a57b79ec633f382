"""Build one Azure ML command job from a sweep point: validate it, snapshot the code with the
job's payload, and write job.yaml.

Every process Azure ML starts runs `python -m nlpwf.azureml.remote nlpwf_job.pkl` in the code
snapshot: the user's task function under Hydra's run_job, with the payload's config (payload.py).
Azure ML itself sets the distributed env contract; there is no torchrun in the command.

The job's shape comes from nlpwf's config when the job is one of nlpwf's (nodes x
compute.processes_per_node on compute.cluster, OMP threads from compute.cores); any other
Hydra app gets one node with one process on hydra.launcher.cluster.
"""
from __future__ import annotations

import copy
import functools
import logging
import re
import secrets
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from nlpwf import PROJECT_ROOT
from nlpwf.azureml import inputs, payload, snapshot, workspace
from nlpwf.azureml import secrets as job_secrets
from nlpwf.config.checks import check_job
from nlpwf.errors import UserError
from nlpwf.runtime import jobfile, threads

log = logging.getLogger(__name__)

AZURE_DIR = "azureml"          # in the job dir: job.yaml, the code snapshot, the collected outputs
JOB_YAML = "job.yaml"
SNAPSHOT_DIR = "snapshot"
OUTPUTS_DIR = "outputs"        # <job dir>/azureml/outputs: the job's ./outputs, once it has ended
REMOTE_COMMAND = f"python -m nlpwf.azureml.remote {payload.PAYLOAD_FILE}"
# The job's named outputs (uri_folder, written as they happen: rw_mount). On the nodes the run
# dir is `results` (model/, metrics.json, train_log.csv, plots, the task's return value) and
# training's checkpoint_dir is `checkpoints`, so both outlive a preempted node.
RESULTS_OUTPUT = "results"
CHECKPOINTS_OUTPUT = "checkpoints"
OUTPUT_MODE = "rw_mount"
# Where a job's checkpoints output lives in the datastore: known before submitting, so a
# resubmitted job can name it again (hydra.launcher.checkpoints_from=JOB_NAME).
CHECKPOINTS_PATH = "azureml://datastores/{datastore}/paths/nlpwf/checkpoints/{job}/"
# gloo picks its interface from the hostname, which may resolve to loopback on the nodes.
DEFAULT_ENV = {"GLOO_SOCKET_IFNAME": "eth0"}
CLUSTER_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9-]{1,15}$")  # AmlCompute's naming rule


@dataclass
class JobSpec:
    """A job built and validated here: what a dry run shows, emulate runs and submit sends."""

    name: str
    job_dir: Path
    job_yaml: Path
    cluster: dict
    vm_size: str | None = None
    nodes: int = 1
    processes_per_node: int = 1
    environment_variables: dict[str, str] = field(default_factory=dict)
    inputs: list = field(default_factory=list)      # inputs.JobInput, one per distinct path
    checkpoints: str | None = None                  # the checkpoints output's datastore URI (train jobs)


def nlpwf_job(cfg: DictConfig) -> bool:
    """Whether the config is one of nlpwf's (composed from conf/config.yaml), which says the job's shape."""
    return all(key in cfg for key in ("nodes", "compute", "stage"))


def layout(cfg: DictConfig) -> tuple[int, int]:
    """(instance_count, process_count_per_instance). Only training is distributed (as locally,
    see nlpwf.stages.train); a Hydra app other than nlpwf runs as one process."""
    if not nlpwf_job(cfg) or cfg.stage.name != "train":
        return 1, 1
    return int(cfg.nodes), int(cfg.compute.processes_per_node)


def omp_threads(cfg: DictConfig) -> int:
    """OMP threads per process on the VM: the configured count, else its physical cores shared
    out among the processes the stage really runs there (one for every stage but train)."""
    return threads.threads_per_process(cfg.compute.get("threads_per_process"), layout(cfg)[1],
                                       cores=cfg.compute.get("cores"))


def trains(cfg: DictConfig) -> bool:
    return nlpwf_job(cfg) and cfg.stage.name == "train"


def checkpoints_uri(name: str, settings: DictConfig) -> str:
    """The checkpoints output of job `name`: its own path, or the one of the job it continues."""
    source = settings.get("checkpoints_from")
    if source and str(source).startswith("azureml://"):
        return str(source)
    return CHECKPOINTS_PATH.format(datastore=settings.get("datastore") or "workspaceblobstore", job=source or name)


def node_overrides(cfg: DictConfig, job_inputs: list) -> list[str]:
    """The overrides in the job's command that point the config at the job's inputs and outputs
    on the nodes (nlpwf.azureml.remote applies them); the payload and nlpwf_job.yaml show them too."""
    args = [*inputs.command_args(job_inputs), f"hydra.run.dir=${{{{outputs.{RESULTS_OUTPUT}}}}}"]
    if trains(cfg):
        args.append(f"checkpoint_dir=${{{{outputs.{CHECKPOINTS_OUTPUT}}}}}")
        if OmegaConf.select(cfg, "training.resume", default=None) in (None, "null", "none"):
            args.append("training.resume=auto")  # a retried or resubmitted job continues from its checkpoints
    return args


def command(cfg: DictConfig, job_inputs: list) -> str:
    """The job's command: the remote entry with node_overrides."""
    return " ".join([REMOTE_COMMAND, *node_overrides(cfg, job_inputs)])


def cluster_of(cfg: DictConfig, settings: DictConfig) -> dict:
    """The AmlCompute cluster the job runs on (its settings, for creating it when missing)."""
    if nlpwf_job(cfg):
        cluster = OmegaConf.select(cfg, "compute.cluster", default=None)
        if cluster is None or not cluster.get("name"):
            raise UserError(f"compute={cfg.compute.name} names no Azure ML cluster: choose an Azure option "
                            "(compute=d32_v5, d32s_v6 or d32as_v6) or set compute.cluster.name")
        return OmegaConf.to_container(cluster, resolve=True)
    if not settings.get("cluster"):
        raise UserError("the job's config names no Azure ML cluster (it has no compute.cluster.name): "
                        "set hydra.launcher.cluster to the AmlCompute cluster to run it on")
    return {"name": str(settings.cluster)}


def validate(cfg: DictConfig, settings: DictConfig, sweeper_target: str | None, cwd: str | Path | None = None) -> None:
    """What Azure would reject late (or never): each a one-line error naming the fix. `cwd`: where
    the user started (config.json is searched from there)."""
    if nlpwf_job(cfg):
        check_job(cfg)  # types, then nodes x processes (config.checks.check_layout, as for local jobs), ...
    cluster = cluster_of(cfg, settings)
    if not CLUSTER_NAME.match(str(cluster["name"])):
        raise UserError(f"{'compute.cluster.name' if nlpwf_job(cfg) else 'hydra.launcher.cluster'}={cluster['name']} "
                        "is not a valid AmlCompute name: use 2-16 letters, digits or hyphens, starting with a letter")
    if nlpwf_job(cfg):
        if cluster.get("max_instances") is not None and cfg.nodes > cluster["max_instances"]:
            raise UserError(f"nodes={cfg.nodes} is above compute.cluster.max_instances={cluster['max_instances']}: "
                            f"lower nodes or set compute.cluster.max_instances={cfg.nodes}")
        if cfg.compute.get("cores") is None and not cfg.compute.get("threads_per_process"):
            raise UserError(f"compute={cfg.compute.name} has no cores count: set compute.cores (physical cores per VM)")
    inputs.job_inputs(cfg, cwd)  # each path key: here, an Azure ML URI, or a package/Hub id (raises otherwise)
    inputs.check_mode(settings.get("input_mode") or "ro_mount")
    if not settings.environment.image:
        docker_context(settings)  # raises when missing
        if nlpwf_job(cfg):
            refuse_what_the_image_lacks(cfg)
    if not (settings.dry_run or settings.emulate):
        if not settings.wait and sweeper_target and not sweeper_target.endswith("BasicSweeper"):
            raise UserError("this sweeper needs each job's result: add hydra.launcher.wait=true")
        for key in ("register_model", "download_model"):  # both act once the job has ended
            if settings.get(key) and not settings.wait:
                raise UserError(f"hydra.launcher.{key}={settings.get(key)} acts on the finished job: "
                                "add hydra.launcher.wait=true")
        workspace.check(settings.workspace, start=cwd)


def refuse_what_the_image_lacks(cfg: DictConfig) -> None:
    """Settings whose software docker/ does not install (docker/Dockerfile says why) fail on the
    nodes only after the wait for them: refused here, each as one line. A ready image
    (hydra.launcher.environment.image) may carry them, so it is not checked."""
    if cfg.get("logger") is not None and cfg.logger.get("wandb") is not None:
        raise UserError("logger=wandb: wandb is not in the Azure ML image (docker/), and its API key would show in "
                        "the job's environment in Studio: use logger=mlflow or logger=none (Studio shows the "
                        "metrics either way), or a ready image with wandb (hydra.launcher.environment.image)")
    if OmegaConf.select(cfg, "stage.name", default=None) == "quantize":
        raise UserError("stage=quantize: neural-compressor is not in the Azure ML image (docker/): download the "
                        "model (hydra.launcher.download_model=true) and quantize it here, or use a ready image "
                        "with it (hydra.launcher.environment.image)")
    if OmegaConf.select(cfg, "training.torch_compile", default=False):
        raise UserError("training.torch_compile=true: torch.compile needs a C++ compiler, which the slim Azure ML "
                        "image (docker/) does not have: set training.torch_compile=false, or use a ready image with "
                        "one (hydra.launcher.environment.image)")


def check_python(packed: payload.Packed, settings: DictConfig) -> None:
    """A payload with code pickled by value (bytecode) loads only on the Python that wrote it."""
    if not packed.by_value or settings.emulate or settings.environment.image:
        return  # emulate runs this Python; a ready image's Python cannot be read from here
    dockerfile = docker_context(settings) / "Dockerfile"
    image = payload.image_python(dockerfile)
    if image is not None and image != payload.python_version():
        raise UserError(f"the task {packed.task_name} is not importable from the code snapshot, so it is sent as "
                        f"Python {payload.python_version()} bytecode, which the image's Python {image} ({dockerfile}) "
                        f"cannot load: run from a Python {image} environment, or make the task a module-level "
                        "function of the project")


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


def environment_variables(cfg: DictConfig, settings: DictConfig) -> dict[str, str]:
    env = dict(DEFAULT_ENV)
    if nlpwf_job(cfg):
        env["OMP_NUM_THREADS"] = str(omp_threads(cfg))
        env["TOKENIZERS_PARALLELISM"] = "false"  # its thread pool would compete with the OMP threads of the ranks
    own = {str(k): str(v) for k, v in (settings.environment_variables or {}).items()}
    job_secrets.refuse_credentials(own)
    env.update(own)
    env.update(job_secrets.job_environment(settings.get("key_vault"), settings.get("secrets")))
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
    if not nlpwf_job(cfg):
        return f"{hydra_cfg.job.name}-{hydra_cfg.job.num}"
    experiment = hydra_cfg.runtime.choices.get("experiment") or cfg.stage.name
    nodes, procs = layout(cfg)
    return f"{experiment}-{cfg.compute.name}-{nodes}x{procs}-{hydra_cfg.job.num}"


def command_job(spec: JobSpec, cfg: DictConfig, settings: DictConfig, hydra_cfg: DictConfig, code, environment):
    """The SDK's CommandJob. `code` and `environment` are paths/objects or ARM ids."""
    from azure.ai.ml import Output, PyTorchDistribution
    from azure.ai.ml.entities import CommandJob, CommandJobLimits, JobResourceConfiguration

    mode = inputs.check_mode(settings.get("input_mode") or "ro_mount")
    outputs = {RESULTS_OUTPUT: Output(type="uri_folder", mode=OUTPUT_MODE)}
    if spec.checkpoints:
        outputs[CHECKPOINTS_OUTPUT] = Output(type="uri_folder", mode=OUTPUT_MODE, path=spec.checkpoints)

    return CommandJob(
        name=spec.name,
        display_name=display_name(cfg, hydra_cfg),
        experiment_name=settings.experiment_name,
        tags=tags(hydra_cfg),
        code=code,
        command=command(cfg, spec.inputs),
        inputs={i.name: i.to_sdk(mode) for i in spec.inputs},
        outputs=outputs,
        environment=environment,
        environment_variables=spec.environment_variables,
        compute=spec.cluster["name"],
        resources=JobResourceConfiguration(instance_count=spec.nodes),
        distribution=PyTorchDistribution(process_count_per_instance=spec.processes_per_node),
        # Azure cancels a job that runs longer (hydra.launcher.timeout_s; null: no limit)
        limits=CommandJobLimits(timeout=int(settings.timeout_s)) if settings.get("timeout_s") else None,
    )


def environment(settings: DictConfig):
    """The training environment: a ready image, or an anonymous one Azure builds from docker/
    (registered by content hash, so it is rebuilt only when docker/ changes)."""
    from azure.ai.ml.entities import BuildContext, Environment

    if settings.environment.image:
        return Environment(image=settings.environment.image)
    return Environment(build=BuildContext(path=str(docker_context(settings))))


def prepare(sweep_config: DictConfig, task_cfg: DictConfig, job_dir: Path, settings: DictConfig,
            task: Callable, callbacks) -> JobSpec:
    """Validate the job, write its code snapshot (the project, the payload and the readable
    resolved config) and <job dir>/azureml/job.yaml, loadable by azure.ai.ml.load_job: what is
    submitted is that file, loaded back. `sweep_config` is the job's config with Hydra's node,
    `task_cfg` the task's part of it."""
    hydra_cfg = sweep_config.hydra
    validate(sweep_config, settings, OmegaConf.select(hydra_cfg, "sweeper._target_"), cwd=hydra_cfg.runtime.cwd)
    job_inputs = inputs.job_inputs(sweep_config, hydra_cfg.runtime.cwd)
    overrides = node_overrides(sweep_config, job_inputs)
    packed = payload.pack(task, sweep_config, callbacks, overrides)
    check_python(packed, settings)
    azure_dir = job_dir / AZURE_DIR
    snap = snapshot.build(azure_dir / SNAPSHOT_DIR, max_file_mb=settings.snapshot_max_file_mb)
    (snap / payload.PAYLOAD_FILE).write_bytes(packed.data)
    # For people (the payload is not readable): the config the nodes run, with the `${{...}}` bindings
    readable = copy.deepcopy(task_cfg)
    OmegaConf.copy_cache(from_config=task_cfg, to_config=readable)  # ${now:} as the sweep started
    payload.with_node_overrides(readable, overrides)
    jobfile.write_job_config(readable, snap / jobfile.JOB_CONFIG)
    nodes, procs = layout(sweep_config)
    spec = JobSpec(
        name=job_name(hydra_cfg.job.num), job_dir=job_dir, job_yaml=azure_dir / JOB_YAML,
        cluster=cluster_of(sweep_config, settings),
        vm_size=OmegaConf.select(sweep_config, "compute.vm_size", default=None),
        nodes=nodes, processes_per_node=procs, environment_variables=environment_variables(sweep_config, settings),
        inputs=job_inputs,
    )
    if trains(sweep_config):
        spec.checkpoints = checkpoints_uri(spec.name, settings)
    job = command_job(spec, sweep_config, settings, hydra_cfg, code=str(snap), environment=environment(settings))
    _quiet_sdk()
    # Written under a hidden name and renamed when complete and valid: a job.yaml that exists is
    # whole (the emulator, a resubmission or a person may read it while the launcher runs).
    staged = spec.job_yaml.with_name(f".{JOB_YAML}")
    try:
        job.dump(str(staged))
        keep_local_paths(staged, spec.inputs)
        load(staged)  # the SDK's own client-side validation, on exactly what will be sent
        staged.replace(spec.job_yaml)
    finally:
        staged.unlink(missing_ok=True)
    log.info("Azure ML job %s: %d node(s) x %d process(es) on cluster %s, task %s%s, spec %s",
             spec.name, nodes, procs, spec.cluster["name"], packed.task_name,
             " (by value)" if packed.by_value else "", spec.job_yaml)
    for i in spec.inputs:
        log.info("input %s (%s, %s): %s%s", i.name, i.type, "uploaded at submit" if i.local else "in place",
                 i.path, f" for {', '.join(i.keys)}")
    if spec.checkpoints:
        log.info("checkpoints output: %s", spec.checkpoints)
    return spec


def keep_local_paths(job_yaml: Path, job_inputs: list) -> None:
    """The SDK dumps every input's path as an asset reference (`azureml:/local/path`), which
    would load back as one and never be uploaded: local inputs get their plain path back."""
    import yaml

    local = {i.name: i.path for i in job_inputs if i.local}
    if not local:
        return
    spec = yaml.safe_load(job_yaml.read_text())
    for name, path in local.items():
        spec["inputs"][name]["path"] = path
    job_yaml.write_text(yaml.safe_dump(spec, sort_keys=False))


def load(job_yaml: Path):
    """The job as submitted: the dumped spec, loaded back by the SDK (which validates it)."""
    from azure.ai.ml import load_job

    _quiet_sdk()
    return load_job(str(job_yaml))


def _quiet_sdk() -> None:
    # The SDK warns about its experimental schema classes on every load; nothing for a user to act on.
    warnings.filterwarnings("ignore", module=r"azure\.ai\.ml")
    warnings.filterwarnings("ignore", module=r"marshmallow")
    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)
    for name in ("azure.identity", "azure.core.pipeline.policies.http_logging_policy"):
        logging.getLogger(name).setLevel(logging.WARNING)
