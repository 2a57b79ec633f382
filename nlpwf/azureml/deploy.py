"""stage=deploy: a saved model to an Azure ML managed online endpoint, or its dry run, or its emulation.

The stage writes endpoint.yaml, deployment.yaml, the code folder and the environment's build
context to JOB_DIR/azureml (endpoint.build), then, reading them back:
- dry_run: stops there (no workspace is contacted);
- emulate: runs the deployment here as Azure would start it (`emulate`) and sends it the smoke request;
- otherwise rolls out (`rollout`): registers a local model folder, creates or updates the endpoint
  (key auth) and the deployment, waits for each within stage.timeout_s, moves stage.traffic percent
  to the new deployment once it is healthy, sends the smoke request and prints the answer;
- delete: deletes stage.endpoint with its deployments (the one command docs/serving.md gives).

It is a stage the stages package names but does not import: it talks to Azure ML, which sits above
the stages (docs/development.md#layers). Transient HTTP errors are retried by azure-core's RetryPolicy
(stage.retry); a step still running at stage.timeout_s is left to Azure and reported, never waited on forever.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nlpwf.azureml import endpoint, workspace
from nlpwf.errors import JobFailed, UserError
from nlpwf.inference import server
from nlpwf.results import files
from nlpwf.stages.serve import settings as serve_settings

log = logging.getLogger(__name__)

EMULATE_DIR = "emulate"           # JOB_DIR/azureml/emulate: the instance's /var/azureml-app
APP_ROOT = "var/azureml-app"      # where Azure mounts the deployment's code and models on an instance
MODELS_DIR = "azureml-models"     # a registered model: azureml-models/NAME/VERSION/<its folder or file>


def delete_command(name: str) -> str:
    return f"python -m nlpwf stage=deploy stage.delete=true stage.endpoint={name}"


def run(cfg: DictConfig, job_dir: Path) -> dict:
    stage = cfg.stage
    if stage.delete:
        return delete(stage)
    if not 0 <= stage.traffic <= 100 or stage.instance_count < 1:
        raise UserError(f"stage.traffic={stage.traffic}, stage.instance_count={stage.instance_count}: traffic is a percentage "
                        "(0 to 100) and a deployment needs 1 instance or more")
    if stage.dry_run and stage.emulate:
        raise UserError("stage.dry_run=true and stage.emulate=true: choose one (the dry run starts nothing)")
    azure_dir = Path(job_dir) / endpoint.AZURE_DIR  # made by build(), once the stage's settings are checked
    chosen = serve_settings(cfg)
    built_endpoint, built_deployment, ref = endpoint.build(stage, chosen, azure_dir)
    paths = endpoint.write(built_endpoint, built_deployment, azure_dir)
    spec_endpoint, spec_deployment = endpoint.load(azure_dir)  # what is sent is what was written
    smoke = endpoint.smoke_request(ref.folder, stage)
    result = {"endpoint": stage.endpoint, "deployment": stage.deployment, "model": str(stage.model),
              "instance_type": spec_deployment.instance_type, "backend": ref.backend,
              "endpoint_yaml": str(paths[0]), "deployment_yaml": str(paths[1])}
    if stage.dry_run:
        log.info("dry run: %s and %s (code in %s); nothing sent", paths[0], paths[1], azure_dir / endpoint.CODE_DIR)
    elif stage.emulate:
        result["smoke_response"] = emulate(spec_deployment, ref, smoke, stage, azure_dir)
    else:
        ml_client = workspace.connect(stage.workspace, retry=workspace.retry_kwargs(stage.retry)).ml_client
        result.update(rollout(ml_client, spec_endpoint, spec_deployment, ref, smoke, stage, azure_dir))
    files.write_json(Path(job_dir) / files.METRICS_FILE, result)
    return result


# ---------------------------------------------------------------- Azure

def wait(poller, what: str, timeout_s: float):
    """An LRO's result within timeout_s, or JobFailed saying it is still going on Azure's side."""
    result = poller.result(timeout=timeout_s)
    if not poller.done():
        raise JobFailed(f"{what} was still in progress after {timeout_s:.0f} s (stage.timeout_s); it goes on in Azure ML: "
                        "check it in Studio, or delete it with the command in docs/serving.md")
    return result


def register(ml_client, ref: endpoint.ModelRef, deployment) -> str:
    """A local model folder as a model asset (custom_model, its backend in a tag); returns azureml:NAME:VERSION."""
    model = ml_client.models.create_or_update(deployment.model)
    print(f"registered model {model.name} version {model.version} from {ref.folder}", flush=True)
    return f"azureml:{model.name}:{model.version}"


def registered_backend(ml_client, ref: endpoint.ModelRef, stage: DictConfig, instance_type: str) -> None:
    """A registered model's backend from its nlpwf_backend tag (set when nlpwf registers it): the
    instance's ISA is checked against it before anything is created."""
    if ref.backend is not None or ref.folder is not None:
        return
    tags = ml_client.models.get(name=ref.name, version=ref.version).tags or {}
    if tags.get(endpoint.BACKEND_TAG):
        ref.backend = tags[endpoint.BACKEND_TAG]
        endpoint.choose_instance_type(OmegaConf.merge(stage, {"instance_type": instance_type}), ref.backend)


def rollout(ml_client, spec_endpoint, spec_deployment, ref, smoke: dict, stage: DictConfig, azure_dir: Path) -> dict:
    registered_backend(ml_client, ref, stage, spec_deployment.instance_type)
    shown = ref.registered
    if ref.folder is not None:
        spec_deployment.model = shown = register(ml_client, ref, spec_deployment)
    wait(ml_client.online_endpoints.begin_create_or_update(spec_endpoint), f"endpoint {stage.endpoint}", stage.timeout_s)
    deployed = wait(ml_client.online_deployments.begin_create_or_update(spec_deployment),
                    f"deployment {stage.deployment}", stage.timeout_s)
    state = getattr(deployed, "provisioning_state", None)
    if state != "Succeeded":
        raise JobFailed(f"deployment {stage.deployment} ended {state}: its container log is "
                        f"`ml_client.online_deployments.get_logs({stage.endpoint!r}, {stage.deployment!r}, lines=200)`; "
                        f"`stage.emulate=true` runs it here")
    live = ml_client.online_endpoints.get(stage.endpoint)
    others = {k: v for k, v in (live.traffic or {}).items() if k != stage.deployment and stage.traffic < 100}
    live.traffic = {**others, stage.deployment: int(stage.traffic)}
    wait(ml_client.online_endpoints.begin_create_or_update(live), f"traffic of endpoint {stage.endpoint}", stage.timeout_s)
    request = azure_dir / "smoke.json"
    request.write_text(json.dumps(smoke))
    answer = ml_client.online_endpoints.invoke(endpoint_name=stage.endpoint, deployment_name=stage.deployment,
                                               request_file=str(request))
    print(f"smoke request to {stage.endpoint}/{stage.deployment}: {answer}", flush=True)
    print(f"endpoint {stage.endpoint} serves {shown}; delete it with: {delete_command(stage.endpoint)}", flush=True)
    return {"smoke_response": json.loads(answer) if isinstance(answer, str) else answer, "traffic": dict(live.traffic),
            "scoring_uri": getattr(live, "scoring_uri", None)}


def delete(stage: DictConfig) -> dict:
    ml_client = workspace.connect(stage.workspace, retry=workspace.retry_kwargs(stage.retry)).ml_client
    wait(ml_client.online_endpoints.begin_delete(name=stage.endpoint), f"deleting endpoint {stage.endpoint}", stage.timeout_s)
    print(f"deleted endpoint {stage.endpoint} and its deployments (registered models and environments stay)", flush=True)
    return {"deleted": stage.endpoint}


# ---------------------------------------------------------------- here, as Azure runs it

def emulate(deployment, ref: endpoint.ModelRef, smoke: dict, stage: DictConfig, azure_dir: Path) -> dict:
    """The deployment started here as an instance starts it: its code folder copied under
    /var/azureml-app, the model under azureml-models/NAME/VERSION/<folder> with AZUREML_MODEL_DIR on
    NAME/VERSION, the server started from that copy with the deployment's scoring script and only the
    deployment's own environment variables (no HOME, no HF_* or other variables of this shell), in the
    inference image's packages (.venv-serve). Ready within the readiness probe's budget, then probed
    and sent the smoke request, then stopped with SIGTERM as Azure stops an instance."""
    if ref.folder is None:
        raise UserError(f"stage.emulate=true needs the model's files: give stage.model=DIR (the folder registered as "
                        f"{ref.registered}; `az ml model download` fetches it)")
    root = azure_dir / EMULATE_DIR
    shutil.rmtree(root, ignore_errors=True)
    app = root / APP_ROOT
    source = azure_dir / deployment.code_configuration.code  # relative paths are the YAML file's, as the SDK reads them
    code = app / source.name
    shutil.copytree(source, code)
    model_dir = app / MODELS_DIR / ref.name / ref.version
    shutil.copytree(ref.folder, model_dir / ref.folder.name)
    env = {k: str(v) for k, v in (deployment.environment_variables or {}).items()}
    probe = deployment.readiness_probe
    budget = probe.initial_delay + probe.period * probe.failure_threshold
    started = server.start(model_dir, stage.port, env, root / "server.log", app_root=app,
                           entry_script=code / deployment.code_configuration.scoring_script,
                           python=server.python_for_server(stage.get("server_python")),
                           workers=int(env.get("WORKER_COUNT", 1)), inherit_env=False)
    try:
        server.wait_ready(started, budget)
        status, body = server.post(started.url + "/score", json.dumps(smoke).encode())
    finally:
        code_at_exit = server.stop(started)
    if status != 200:
        raise JobFailed(f"the emulated deployment answered the smoke request with {status}: {body.decode()[:300]}")
    answer = json.loads(body)
    print(f"smoke request to the emulated deployment {stage.endpoint}/{stage.deployment}: {json.dumps(answer)}", flush=True)
    log.info("emulated deployment: ready within the readiness probe's %d s, answered, stopped (exit code %d); log in %s",
             budget, code_at_exit, started.log)
    return answer

