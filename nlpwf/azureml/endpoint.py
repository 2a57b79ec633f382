"""A saved model as an Azure ML managed online endpoint: what nlpwf sends, written down first.

`build` makes the SDK's ManagedOnlineEndpoint (key auth) and ManagedOnlineDeployment: the model
(azureml:NAME:VERSION, or a local folder, inline until it is registered), the code configuration
(a code snapshot holding nlpwf and its scoring script, inference/score.py), the inference
environment (built from docker/inference, or a named one), an instance size whose ISA suits the
model's INT8 backend, probes, request settings, and the scoring script's settings as environment
variables (inference.scoring.Settings). `write` dumps both to endpoint.yaml and deployment.yaml, and
everything after (the dry run, the rollout, the emulation) reads them back with
load_online_endpoint / load_online_deployment: what is sent is what was written.
"""
from __future__ import annotations

import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from nlpwf import PROJECT_ROOT, models
from nlpwf.azureml import snapshot
from nlpwf.errors import UserError
from nlpwf.inference import int8, scoring, server

ENDPOINT_YAML, DEPLOYMENT_YAML = "endpoint.yaml", "deployment.yaml"
AZURE_DIR = "azureml"        # in the job dir: the two YAML files, the code folder, the build context
CODE_DIR = "code"
CONTEXT_DIR = "environment"
INFERENCE_CONTEXT = PROJECT_ROOT / "docker" / "inference"
SCORING_SCRIPT = server.SCORING_SCRIPT.relative_to(PROJECT_ROOT).as_posix()
REGISTERED = re.compile(r"^azureml:([A-Za-z0-9_.-]+):([0-9]+)$")
ENDPOINT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,30}[A-Za-z0-9]$")
BACKEND_TAG = "nlpwf_backend"
NEEDS_DOT_PRODUCT = ("inc_static", "inc_dynamic")


@dataclass
class ModelRef:
    """The model of a deployment: registered (`registered` is azureml:NAME:VERSION) or a local folder."""
    name: str
    version: str
    backend: str | None
    folder: Path | None = None

    @property
    def registered(self) -> str:
        return f"azureml:{self.name}:{self.version}"


def model_ref(stage: DictConfig) -> ModelRef:
    if not stage.model:
        raise UserError("stage=deploy needs stage.model: azureml:NAME:VERSION of a registered model, or a local "
                        "model folder (a training job's model/ or a quantize job's model_int8/)")
    found = REGISTERED.match(str(stage.model))
    if found:
        return ModelRef(found.group(1), found.group(2), stage.backend)
    if str(stage.model).startswith("azureml:"):
        raise UserError(f"stage.model={stage.model}: name a registered model as azureml:NAME:VERSION (e.g. azureml:my-bert:3)")
    folder = models.saved_model_dir(str(stage.model), "deploy").resolve()
    backend = scoring.describe(folder)["backend"]
    if stage.backend and stage.backend != backend:
        raise UserError(f"stage.backend={stage.backend} but {folder} holds a {backend} model: remove stage.backend")
    # The version a new name's first registration gets; the rollout uses the version Azure answers.
    return ModelRef(stage.model_name or f"{stage.endpoint}-model", "1", backend, folder)


def choose_instance_type(stage: DictConfig, backend: str | None) -> str:
    """stage.instance_type, checked against the model's backend, or the first size that suits it. INC's
    INT8 kernels are built on VNNI / AMX-INT8 dot products: a size whose hosts may lack them is refused."""
    table = OmegaConf.to_container(stage.instance_types)
    if backend is not None and backend not in ("fp32", *int8.BACKENDS):
        raise UserError(f"stage.backend={backend}: use fp32 or one of {', '.join(int8.BACKENDS)}")
    suits = {name: backend not in NEEDS_DOT_PRODUCT or spec.get("vnni") is True or spec.get("amx_int8") is True
             for name, spec in table.items()}
    if stage.instance_type is None:
        chosen = next((name for name, ok in suits.items() if ok), None)
        if chosen is None:
            raise UserError(f"no size of stage.instance_types has VNNI or AMX-INT8 on every host, which {backend} INT8 "
                            "needs: add one, or quantize with stage.backend=torch_dynamic")
        return chosen
    if stage.instance_type in table and not suits[stage.instance_type]:
        spec = table[stage.instance_type]
        fitting = ", ".join(n for n, ok in suits.items() if ok)
        raise UserError(f"stage.instance_type={stage.instance_type} ({spec.get('cpu')}) may lack VNNI/AMX-INT8, which the model's "
                        f"{backend} INT8 kernels run on: use one of {fitting}, or a torch_dynamic model")
    return stage.instance_type


def smoke_request(folder: Path | None, stage: DictConfig) -> dict:
    """stage.smoke, else three items of the model's kind (pairs when its folder says so, or unknown)."""
    if stage.smoke is not None:
        return OmegaConf.to_container(stage.smoke)
    pairs = folder is None or len(models.load_saved_config(folder).to_dict().get("text_columns") or ["a", "b"]) == 2
    texts = ["The company said its profit rose .", "Shares fell sharply on Monday .", "The court ruled in its favour ."]
    others = ["Profit at the company went up .", "The market closed higher .", "A judge decided against it ."]
    return {"inputs": [{"text": t, "text_pair": o} if pairs else t for t, o in zip(texts, others)]}


def environment(stage: DictConfig, azure_dir: Path):
    from azure.ai.ml.entities import BuildContext, Environment

    if stage.environment:
        return stage.environment
    context = azure_dir / CONTEXT_DIR
    shutil.copytree(INFERENCE_CONTEXT, context, ignore=shutil.ignore_patterns("*.py", "*.sh", "__pycache__"))
    return Environment(name="nlpwf-inference", build=BuildContext(path=str(context)),
                       description="nlpwf's inference image: docker/inference (Azure ML's inference server, torch, INC)")


def build(stage: DictConfig, settings: scoring.Settings, azure_dir: Path) -> tuple:
    """The endpoint and the deployment for `stage`, with a fresh code folder in azure_dir/code."""
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import (
        CodeConfiguration,
        ManagedOnlineDeployment,
        ManagedOnlineEndpoint,
        Model,
        OnlineRequestSettings,
        ProbeSettings,
    )

    if not ENDPOINT_NAME.match(str(stage.endpoint)):
        raise UserError(f"stage.endpoint={stage.endpoint}: 3 to 32 letters, digits and '-', starting with a letter")
    ref = model_ref(stage)
    instance_type = choose_instance_type(stage, ref.backend)
    azure_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused stage leaves the job dir as it was
    snapshot.build(azure_dir / CODE_DIR)
    model = (Model(path=str(ref.folder), name=ref.name, type=AssetTypes.CUSTOM_MODEL, tags={BACKEND_TAG: ref.backend})
             if ref.folder else ref.registered)
    endpoint = ManagedOnlineEndpoint(name=stage.endpoint, auth_mode="key", tags={"nlpwf": "serve"},
                                     description="nlpwf text classifier: POST /score {\"inputs\": [...]}")
    deployment = ManagedOnlineDeployment(
        name=stage.deployment, endpoint_name=stage.endpoint, model=model,
        code_configuration=CodeConfiguration(code=str(azure_dir / CODE_DIR), scoring_script=SCORING_SCRIPT),
        environment=environment(stage, azure_dir), instance_type=instance_type, instance_count=stage.instance_count,
        # WORKER_COUNT: the server's own variable for its worker processes.
        environment_variables={**settings.env(), "WORKER_COUNT": str(settings.workers)},
        request_settings=OnlineRequestSettings(**OmegaConf.to_container(stage.request_settings)),
        liveness_probe=ProbeSettings(**OmegaConf.to_container(stage.liveness_probe)),
        readiness_probe=ProbeSettings(**OmegaConf.to_container(stage.readiness_probe)),
        tags={BACKEND_TAG: ref.backend} if ref.backend else {},
    )
    return endpoint, deployment, ref


def write(endpoint, deployment, azure_dir: Path) -> tuple[Path, Path]:
    """endpoint.yaml and deployment.yaml in azure_dir, paths relative to it (the folder can move)."""
    # Public calls only: a deployment's dump() writes YAML to a stream; an endpoint's dump() ignores
    # its destination (azure-ai-ml 1.35) and returns the dict. Read back as plain dicts either way.
    stream = io.StringIO()
    deployment.dump(stream)
    spec = yaml.safe_load(stream.getvalue())
    spec["code_configuration"]["code"] = CODE_DIR
    if isinstance(spec.get("environment"), dict) and "build" in spec["environment"]:
        spec["environment"]["build"]["path"] = CONTEXT_DIR
    paths = azure_dir / ENDPOINT_YAML, azure_dir / DEPLOYMENT_YAML
    paths[0].write_text(yaml.safe_dump(json.loads(json.dumps(endpoint.dump())), sort_keys=False))
    paths[1].write_text(yaml.safe_dump(spec, sort_keys=False))
    return paths


def load(azure_dir: Path) -> tuple:
    """The endpoint and deployment as written (the SDK's own loaders, which validate them)."""
    from azure.ai.ml import load_online_deployment, load_online_endpoint

    return load_online_endpoint(str(azure_dir / ENDPOINT_YAML)), load_online_deployment(str(azure_dir / DEPLOYMENT_YAML))
