from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class WorkspaceConf:
    # config.json downloaded from Azure ML Studio; null: look in the current dir and its parents
    # (also in .azureml/), as the SDK does. Ignored when the three ids below are all set.
    config_path: Optional[str] = None
    subscription_id: Optional[str] = None
    resource_group: Optional[str] = None
    workspace_name: Optional[str] = None


@dataclass
class EnvironmentConf:
    # Docker build context of the training image (relative paths are from the project root).
    docker_context: str = "docker"
    # A ready image (e.g. myregistry.azurecr.io/nlpwf:1) instead of building docker_context.
    image: Optional[str] = None


@dataclass
class AzureMLLauncherConf:
    _target_: str = "hydra_plugins.nlpwf_azureml_launcher.azureml_launcher.NlpwfAzureMLLauncher"
    # true: poll until every job ends, download its outputs, return what its task returned (sweepers need it).
    wait: bool = False
    # with wait and a single job: print the job's log as it runs instead of polling quietly.
    stream: bool = False
    # write azureml/job.yaml and the code snapshot in the job dir, submit nothing, need no credentials.
    dry_run: bool = False
    # run the generated job on this machine as Azure ML would (snapshot copy, env contract).
    emulate: bool = False
    poll_interval_s: float = 30.0
    # Bounded waiting. The job's time limit on Azure (limits.timeout; null: none): Azure cancels it after that.
    timeout_s: Optional[int] = None
    # A job still NotStarted/Queued/Preparing/Provisioning/Starting this long after submission is
    # cancelled and reported (no quota, cluster at max_instances). Generous: the first job builds the image.
    queue_timeout_s: Optional[float] = 7200.0
    # azure-core's RetryPolicy for every HTTP request (408, 429, 5xx, dropped connections): tries
    # and exponential backoff (retry_backoff_factor * 2**(n-1) s, at most retry_backoff_max s).
    retry_total: int = 10
    retry_backoff_factor: float = 0.8
    retry_backoff_max: float = 120.0
    # polls in a row that may still fail transiently (after those retries) before the job is reported failed
    transient_errors_max: int = 10
    # when the sweep aborts (Ctrl-C, or a failed job under a sweeper that stops at the first
    # failure, such as Optuna's default max_failure_rate 0), cancel the batch's other jobs
    cancel_on_abort: bool = True
    # with wait: also download the trained model/ (metrics.json, train_log.csv and the plots always come back)
    download_model: bool = False
    # with wait: register the successful job's model/ (its results output) as this Azure ML model asset
    register_model: Optional[str] = None
    # jobs of a sweep submitted and watched at the same time
    max_parallel: int = 8
    experiment_name: str = "nlpwf"
    # The AmlCompute cluster of a job whose config names none (a Hydra app other than nlpwf, whose
    # compute options set compute.cluster); such a job gets one node with one process.
    cluster: Optional[str] = None
    workspace: WorkspaceConf = field(default_factory=WorkspaceConf)
    environment: EnvironmentConf = field(default_factory=EnvironmentConf)
    # added to the job's own (OMP_NUM_THREADS, ...); values are strings on Azure, stored with the job and
    # shown in Studio: one that looks like a credential is refused (use key_vault and secrets instead)
    environment_variables: Dict[str, Any] = field(default_factory=dict)
    # Secrets the job fetches itself at run time, with its cluster's managed identity: environment
    # variable name -> secret name in this Azure Key Vault (https://VAULT.vault.azure.net). Only names are sent.
    key_vault: Optional[str] = None
    secrets: Dict[str, str] = field(default_factory=dict)
    # files above this size stay out of the code snapshot (data and weights belong in datastores)
    snapshot_max_file_mb: float = 20.0
    # where emulate copies the snapshot for each node; null: <job dir>/azureml/emulate, removed
    # when the job succeeds (a failed job's node dirs are kept either way)
    emulate_dir: Optional[str] = None
    # How the nodes see the job's inputs (local data and models, uploaded at submit, and azureml:
    # URIs): ro_mount (read on demand) or download (copied to the node's disk before the command).
    input_mode: str = "ro_mount"
    # The blob datastore of the job's checkpoints output (azureml://datastores/NAME/paths/nlpwf/checkpoints/JOB/)
    # and of its uploaded local inputs (LocalUpload/<content hash>/).
    datastore: str = "workspaceblobstore"
    # A job name (or an azureml://datastores/... folder): the new job writes to and resumes from that
    # job's checkpoints output (resubmitting a preempted or failed job; training.resume=auto).
    checkpoints_from: Optional[str] = None
    # emulate: the local folder standing for the workspace's datastores (the named outputs live in
    # it, as on Azure); null: <job dir>/azureml/datastore. Keep it to emulate a resubmission.
    emulate_datastore: Optional[str] = None


ConfigStore.instance().store(group="hydra/launcher", name="nlpwf_azureml", node=AzureMLLauncherConf, provider="nlpwf")
