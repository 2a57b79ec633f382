"""stage=deploy: the dry run's YAML loaded back by the SDK with no workspace, the rollout's REST
requests at azure-core's transport (endpoint, deployment, traffic, smoke request), and the
deployment emulated here: started from its own code folder, model layout and environment variables
by the real inference server, answering the smoke request, and failing here when it would on Azure."""
from __future__ import annotations

import json
import shutil
import urllib.parse
from pathlib import Path

import pytest
import yaml
from azure.ai.ml import load_online_deployment, load_online_endpoint
from omegaconf import OmegaConf

from nlpwf import stages
from nlpwf.azureml import deploy, endpoint, workspace
from nlpwf.errors import JobFailed, UserError
from nlpwf.stages.serve import settings
from tests.test_azureml_job import FAKE_WS, FakeCredential, RecordingTransport

from conftest import compose, run_cli, save_tiny_model

PREFIX = (f"/subscriptions/{FAKE_WS['subscription_id']}/resourceGroups/{FAKE_WS['resource_group']}"
          f"/providers/Microsoft.MachineLearningServices/workspaces/{FAKE_WS['workspace_name']}")
SCORING_URI = "https://nlpwf-endpoint.westeurope.inference.ml.azure.com/score"
KEY = "primary-key-never-printed"


def test_dry_run_writes_yaml_the_sdk_loads_with_no_workspace(tmp_path, monkeypatch):
    # In-process, as the CLI runs it (the config checks, then the stage); from a folder with no config.json.
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "job"
    job.mkdir()
    result = stages.run(compose("stage=deploy", "stage.model=azureml:my-bert:3", "stage.dry_run=true"), job)
    assert result["deployment_yaml"] == str(job / "azureml" / "deployment.yaml")
    azure = job / "azureml"
    ep = load_online_endpoint(str(azure / "endpoint.yaml"))
    dep = load_online_deployment(str(azure / "deployment.yaml"))
    assert (ep.name, ep.auth_mode) == ("nlpwf-endpoint", "key")
    assert (dep.endpoint_name, dep.instance_count) == ("nlpwf-endpoint", 1)
    assert dep.model in ("azureml:my-bert:3", "my-bert:3")  # the SDK's loader drops the prefix
    assert (azure / dep.code_configuration.code / dep.code_configuration.scoring_script).is_file()
    assert (azure / dep.environment.build.path / "Dockerfile").is_file()
    assert dep.liveness_probe.initial_delay == 600 and dep.readiness_probe.failure_threshold == 30
    assert dep.request_settings.max_concurrent_requests_per_instance == 1
    assert dep.environment_variables["NLPWF_SERVE_MAX_BATCH"] == "64"
    assert not (azure / "code" / "config.json").exists()  # the code snapshot's rules apply


def test_an_inc_int8_model_is_refused_a_size_whose_hosts_may_lack_vnni():
    stage = compose("stage=deploy", "stage.model=azureml:my-bert:3", "stage.backend=inc_static",
                    "stage.instance_type=Standard_F8s_v2").stage
    with pytest.raises(UserError, match="Standard_F8s_v2 .* may lack VNNI/AMX-INT8.*Standard_D4s_v6"):
        endpoint.choose_instance_type(stage, stage.backend)
    auto = OmegaConf.merge(stage, {"instance_type": None})
    assert endpoint.choose_instance_type(auto, "inc_static") == "Standard_D4s_v6"
    assert endpoint.choose_instance_type(stage, "torch_dynamic") == "Standard_F8s_v2"


def test_a_bad_model_reference_is_one_line(tmp_path):
    with pytest.raises(UserError, match="azureml:NAME:VERSION") as e:
        stages.run(compose("stage=deploy", "stage.model=azureml:my-bert", "stage.dry_run=true"), tmp_path)
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


class EndpointTransport(RecordingTransport):
    """ARM's online endpoints and deployments (a PUT is answered as done), listKeys, the registered
    model's tags, and the endpoint's scoring URI, which answers as the scoring script does."""

    def __init__(self, model_tags=None):
        super().__init__()
        self.store, self.model_tags = {}, model_tags or {}

    def send(self, request, **kwargs):
        self.requests.append(request)
        url = urllib.parse.urlsplit(request.url)
        path = url.path
        if url.netloc.endswith("inference.ml.azure.com"):
            items = json.loads(request.body)["inputs"]
            return self.response(request, 200, {"predictions": [{"label": "1", "probabilities": {"0": 0.2, "1": 0.8}}] * len(items)})
        if request.method == "PUT" and "/onlineEndpoints/" in path:
            body = json.loads(request.body)
            body.update(id=path, name=path.rsplit("/", 1)[1])
            body["properties"]["provisioningState"] = "Succeeded"
            if "/deployments/" in path:
                body["properties"].setdefault("scaleSettings", {"scaleType": "Default"})  # as ARM fills it in
            else:
                body["properties"]["scoringUri"] = SCORING_URI
            self.store[path] = body
            return self.response(request, 201, body)
        if request.method == "GET" and path in self.store:
            return self.response(request, 200, self.store[path])
        if request.method == "GET" and path.endswith("/deployments"):
            return self.response(request, 200, {"value": [b for k, b in self.store.items() if k.startswith(path + "/")]})
        if request.method == "GET" and path == PREFIX:
            return self.response(request, 200, {"id": path, "name": FAKE_WS["workspace_name"], "location": "westeurope",
                                                "properties": {}})
        if request.method == "GET" and "/models/" in path:
            return self.response(request, 200, {"id": path, "name": "3", "properties": {
                "tags": self.model_tags, "flavors": {}, "modelType": "custom_model", "modelUri": "azureml://x"}})
        if request.method == "POST" and path.endswith("/listKeys"):
            return self.response(request, 200, {"primaryKey": KEY, "secondaryKey": "secondary"})
        return super().send(request)

    def writes(self) -> list[tuple[str, str, dict]]:
        return [(r.method, urllib.parse.urlsplit(r.url).path.replace(PREFIX, ""), json.loads(r.body or "{}"))
                for r in self.requests if r.method in ("PUT", "POST", "PATCH")]


def built(tmp_path: Path, *overrides: str):
    """A deployment built and written by stage=deploy's own code, loaded back; code and environment as
    ARM ids (a local path would make the SDK upload them to a storage account)."""
    cfg = compose("stage=deploy", "stage.model=azureml:my-bert:3", *overrides)
    azure = tmp_path / "azureml"
    azure.mkdir()
    ep, dep, ref = endpoint.build(cfg.stage, settings(cfg), azure)
    endpoint.write(ep, dep, azure)
    spec = yaml.safe_load((azure / "deployment.yaml").read_text())
    spec["code_configuration"]["code"] = f"azureml:{PREFIX}/codes/nlpwf-serve/versions/1"
    spec["environment"] = f"azureml:{PREFIX}/environments/nlpwf-inference/versions/1"
    (azure / "deployment.yaml").write_text(yaml.safe_dump(spec))
    return cfg.stage, azure, ref, *endpoint.load(azure)


def test_rollout_sends_endpoint_deployment_then_traffic_then_the_smoke_request(tmp_path, capsys):
    stage, azure, ref, ep, dep = built(tmp_path)
    transport = EndpointTransport()
    ml_client = workspace.connect(OmegaConf.create(FAKE_WS), credential=FakeCredential(), transport=transport).ml_client
    smoke = endpoint.smoke_request(None, stage)
    result = deploy.rollout(ml_client, ep, dep, ref, smoke, stage, azure)
    writes = transport.writes()
    assert [(m, p) for m, p, _ in writes] == [
        ("PUT", "/onlineEndpoints/nlpwf-endpoint"), ("PUT", "/onlineEndpoints/nlpwf-endpoint/deployments/blue"),
        ("PUT", "/onlineEndpoints/nlpwf-endpoint"), ("POST", "/onlineEndpoints/nlpwf-endpoint/listKeys"), ("POST", "/score")]
    first, deployment, traffic = writes[0][2], writes[1][2], writes[2][2]
    assert first["properties"]["authMode"] == "Key" and not first["properties"].get("traffic")
    props = deployment["properties"]
    assert deployment["sku"]["capacity"] == 1 and props["instanceType"] == "Standard_D4s_v6"
    assert props["model"].endswith("/models/my-bert/versions/3")
    assert props["codeConfiguration"]["scoringScript"] == "nlpwf/inference/score.py"
    assert props["requestSettings"]["maxConcurrentRequestsPerInstance"] == 1
    assert props["livenessProbe"]["initialDelay"] == "PT10M" and props["readinessProbe"]["failureThreshold"] == 30
    assert traffic["properties"]["traffic"] == {"blue": 100}
    assert writes[4][2] == smoke and transport.requests[-1].headers["Authorization"] == f"Bearer {KEY}"
    assert len(result["smoke_response"]["predictions"]) == 3 and result["traffic"] == {"blue": 100}
    out = capsys.readouterr().out
    assert "smoke request to nlpwf-endpoint/blue" in out and deploy.delete_command("nlpwf-endpoint") in out
    assert KEY not in out and FAKE_WS["subscription_id"] not in out


def test_a_registered_inc_model_on_a_size_without_vnni_is_refused_before_any_put(tmp_path):
    stage, azure, ref, ep, dep = built(tmp_path, "stage.instance_type=Standard_F8s_v2")
    transport = EndpointTransport(model_tags={"nlpwf_backend": "inc_static"})
    ml_client = workspace.connect(OmegaConf.create(FAKE_WS), credential=FakeCredential(), transport=transport).ml_client
    with pytest.raises(UserError, match="may lack VNNI"):
        deploy.rollout(ml_client, ep, dep, ref, {"inputs": ["x"]}, stage, azure)
    assert transport.writes() == []


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.slow  # an emulated deployment: a server process
def test_the_emulated_deployment_answers_the_smoke_request(tiny_model, tmp_path):
    job = tmp_path / "job"
    proc = run_cli("stage=deploy", f"stage.model={tiny_model}", "stage.emulate=true", "stage.port=0",
                   f"hydra.run.dir={job}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("smoke request to the emulated deployment"))
    predictions = json.loads(line.split(": ", 1)[1])["predictions"]
    assert len(predictions) == 3 and all(set(p["probabilities"]) == {"0", "1"} for p in predictions)
    app = job / "azureml" / "emulate" / "var" / "azureml-app"
    assert (app / "azureml-models" / "nlpwf-endpoint-model" / "1" / "model" / "config.json").is_file()
    log = (job / "azureml" / "emulate" / "server.log").read_text()
    assert f"Model Directory: {app / 'azureml-models' / 'nlpwf-endpoint-model' / '1'}" in log


@pytest.mark.slow  # starts the emulated server each time
@pytest.mark.parametrize("breakage, expected", [
    ("script", "No such file or directory"),     # the scoring script is not where the deployment says
    ("layout", "should hold one saved model"),    # the registered folder holds no model
])
def test_a_deployment_that_would_not_start_on_azure_fails_here(tiny_model, tmp_path, breakage, expected):
    cfg = compose("stage=deploy", f"stage.model={tiny_model}", "stage.port=0")
    azure = tmp_path / "azureml"
    azure.mkdir()
    _, dep, ref = endpoint.build(cfg.stage, settings(cfg), azure)
    if breakage == "script":
        (azure / "code" / "nlpwf" / "inference" / "score.py").unlink()
    else:
        empty = tmp_path / "registered" / "model"
        empty.mkdir(parents=True)
        shutil.copy(tiny_model / "tokenizer.json", empty)
        ref.folder = empty
    with pytest.raises(JobFailed, match="stopped .* before it was ready") as failed:
        deploy.emulate(dep, ref, {"inputs": ["x"]}, cfg.stage, azure)
    assert expected in str(failed.value)
