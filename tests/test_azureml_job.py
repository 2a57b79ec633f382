"""The Azure ML job nlpwf builds: its YAML (dry run) and the exact REST request the SDK sends."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from azure.ai.ml import load_job
from azure.core.credentials import AccessToken, AccessTokenInfo
from azure.core.pipeline.transport import HttpTransport
from azure.core.rest._http_response_impl import HttpResponseImpl
from azure.core.utils import CaseInsensitiveDict

from nlpwf.azureml import job as azjob
from nlpwf.azureml import launch, payload, submit, workspace

from conftest import run_cli

FAKE_WS = {"subscription_id": "11111111-2222-3333-4444-555555555555", "resource_group": "rg-nlpwf-test",
           "workspace_name": "ws-nlpwf-test"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    """`python -m nlpwf compute=d32_v5 nodes=2 hydra.launcher.dry_run=true` (README's example), no -m,
    run from a folder holding a config.json whose values must not leak anywhere."""
    cwd = tmp_path_factory.mktemp("dry")
    (cwd / "config.json").write_text(json.dumps(FAKE_WS))
    sweep = cwd / "sweep"
    r = run_cli("compute=d32_v5", "nodes=2", "hydra.launcher.dry_run=true",
                f"hydra.sweep.dir={sweep}", cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return sweep / "0"


def test_dry_run_job_yaml_loads_with_the_layout(dry_run):
    job = load_job(dry_run / "azureml" / "job.yaml")
    assert job.resources.instance_count == 2
    assert job.distribution.type == "pytorch" and job.distribution.process_count_per_instance == 2
    assert job.compute == "cpu-d32-v5"
    assert job.environment_variables["OMP_NUM_THREADS"] == "8"  # 16 cores / 2 processes
    assert job.environment_variables["GLOO_SOCKET_IFNAME"] == "eth0"  # gloo would pick the hostname's interface
    assert job.experiment_name == "nlpwf"
    assert job.tags["overrides"] == "compute=d32_v5 nodes=2" and job.tags["job_num"] == "0"
    assert len(job.tags["git_commit"]) in (40, len("unknown"))
    # every process Azure ML starts runs the task from the payload (no torchrun: Azure starts them),
    # its run dir and checkpoints on the job's named outputs, resuming from the checkpoints there
    assert job.command == ("python -m nlpwf.azureml.remote nlpwf_job.pkl hydra.run.dir=${{outputs.results}} "
                           "checkpoint_dir=${{outputs.checkpoints}} training.resume=auto")
    assert {n: (o.type, o.mode) for n, o in job.outputs.items()} == {
        "results": ("uri_folder", "rw_mount"), "checkpoints": ("uri_folder", "rw_mount")}
    assert job.outputs["checkpoints"].path == f"azureml://datastores/workspaceblobstore/paths/nlpwf/checkpoints/{job.name}/"
    assert not job.inputs  # the shipped sample data is in the code (package:)
    assert Path(job.environment.build.path, "Dockerfile").is_file()
    assert job._validate().passed
    rows = list(csv.DictReader((dry_run.parent / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["DRY_RUN"] and rows[0]["eval_accuracy"] == ""
    # the job dir is Hydra's own, made here by run_job: .hydra/ with the job's overrides, and its log
    assert yaml.safe_load((dry_run / ".hydra" / "overrides.yaml").read_text()) == ["compute=d32_v5", "nodes=2"]
    assert "Azure ML job nlpwf-" in (dry_run / "nlpwf.log").read_text()


def test_dry_run_snapshot_has_the_resolved_config_and_no_workspace_values(dry_run):
    snap = dry_run / "azureml" / "snapshot"
    resolved = (snap / "nlpwf_job.yaml").read_text()
    # precision=auto goes to the nodes undecided: they decide it on their own CPUs, not this machine
    assert "precision:\n  name: auto" in resolved and "nodes: 2" in resolved
    # what the nodes run: the outputs' bindings, nothing left to resolve but Azure's own `${{...}}`
    assert "checkpoint_dir: ${{outputs.checkpoints}}" in resolved and "resume: auto" in resolved
    assert "${" not in resolved.replace("${{outputs.checkpoints}}", "")
    assert (snap / "nlpwf" / "cli.py").is_file() and (snap / "conf" / "config.yaml").is_file()
    job = payload.read(snap / payload.PAYLOAD_FILE)
    # nlpwf's task by reference: hydra.main's wrapper is nlpwf.cli.main, the task its __wrapped__
    assert job.task == payload.TaskRef("nlpwf.cli", "main", unwrap=1)
    assert job.config.precision.name == "auto" and job.config.nodes == 2
    assert job.config.hydra.run.dir == "outputs" and job.config.hydra.output_subdir is None
    written = [p for p in dry_run.rglob("*") if p.is_file()]
    for value in FAKE_WS.values():
        assert not any(value in p.read_text(errors="ignore") for p in written), value


def test_dry_run_payload_needs_neither_hydra_plugins_nor_bytecode_on_the_nodes(dry_run):
    """The image has no Hydra plugins (the launchers, Optuna's sweeper) and may run another Python
    than this machine: nlpwf's own task and config load without either."""
    found = set()

    class Recording(payload.PayloadUnpickler):
        def find_class(self, module, name):
            found.add((module, name))
            return super().find_class(module, name)

    with open(dry_run / "azureml" / "snapshot" / payload.PAYLOAD_FILE, "rb") as f:
        job = Recording(f).load()
    assert job.task == payload.TaskRef("nlpwf.cli", "main", unwrap=1)
    assert [m for m, _ in found if m.startswith("hydra_plugins")] == []
    assert [m for m, _ in found if m.startswith("cloudpickle")] == []  # cloudpickle's makers of functions and classes
    assert {m.split(".")[0] for m, _ in found} <= {"builtins", "collections", "typing", "hydra", "omegaconf", "packaging",
                                                   "nlpwf", "pathlib", "enum"}


# --- the REST request -------------------------------------------------------------------------

class FakeCredential:
    def get_token(self, *scopes, **kwargs):
        return AccessToken("not-a-token", 4102444800)

    def get_token_info(self, *scopes, **kwargs):
        return AccessTokenInfo("not-a-token", 4102444800)


class RecordingTransport(HttpTransport):
    """azure-core's lowest layer: records each request; a PUT is answered as ARM does (201, the resource)."""

    def __init__(self, status: str = "NotStarted", compute: dict | None = None):
        self.requests = []
        self.status = status  # what a GET of the job answers
        self.compute = compute  # what a GET of the cluster answers (None: 404)
        self.jobs = {}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        pass

    def open(self):
        pass

    def close(self):
        pass

    def send(self, request, **kwargs):
        self.requests.append(request)
        arm_id = request.url.split("?")[0].split("management.azure.com", 1)[-1]
        if request.method == "PUT" and "/jobs/" in arm_id:
            body = json.loads(request.body)
            body.update(id=arm_id, name=arm_id.rsplit("/", 1)[1], type="Microsoft.MachineLearningServices/workspaces/jobs")
            body["properties"]["status"] = "NotStarted"
            self.jobs[arm_id] = body
            return self.response(request, 201, body)
        if request.method == "GET" and arm_id in self.jobs:
            body = json.loads(json.dumps(self.jobs[arm_id]))
            body["properties"]["status"] = self.status
            return self.response(request, 200, body)
        if request.method == "GET" and "/computes/" in arm_id and self.compute:
            return self.response(request, 200, {"id": arm_id, "name": arm_id.rsplit("/", 1)[1], **self.compute})
        return self.response(request, 404, {"error": {"code": "NotFound", "message": "not recorded"}})

    @staticmethod
    def response(request, status, body):
        r = HttpResponseImpl(request=request, internal_response=None, status_code=status, reason="",
                             content_type="application/json", stream_download_generator=None,
                             headers=CaseInsensitiveDict({"Content-Type": "application/json"}))
        r._content = json.dumps(body).encode()
        r._is_closed = r._is_stream_consumed = True  # the whole body is here: nothing left to read
        return r


def test_submission_sends_one_put_with_the_command_job(dry_run, tmp_path, capsys):
    from omegaconf import OmegaConf

    transport = RecordingTransport()
    ws = OmegaConf.create(FAKE_WS)
    ws_client = workspace.connect(ws, credential=FakeCredential(), transport=transport)
    prefix = (f"/subscriptions/{ws.subscription_id}/resourceGroups/{ws.resource_group}"
              f"/providers/Microsoft.MachineLearningServices/workspaces/{ws.workspace_name}")
    # The dry run's job with ARM ids for code and environment: a local path would make the SDK upload.
    spec = yaml.safe_load((dry_run / "azureml" / "job.yaml").read_text())
    spec["code"] = f"azureml:{prefix}/codes/nlpwf-snapshot/versions/1"
    spec["environment"] = f"azureml:{prefix}/environments/nlpwf-cpu/versions/3"
    job_yaml = tmp_path / "job.yaml"
    job_yaml.write_text(yaml.safe_dump(spec))
    job = load_job(job_yaml)
    spec = azjob.JobSpec(name=job.name, job_dir=tmp_path, job_yaml=job_yaml, cluster={"name": "cpu-d32-v5"},
                         vm_size="Standard_D32_v5", nodes=2, processes_per_node=2)

    assert submit.submit_one(ws_client.ml_client, spec) == job.name

    assert [r.method for r in transport.requests] == ["PUT"]
    put = transport.requests[0]
    assert put.url.split("?")[0] == f"https://management.azure.com{prefix}/jobs/{job.name}"
    props = json.loads(put.body)["properties"]
    assert props["jobType"] == "Command"
    assert props["command"] == job.command and job.command.startswith("python -m nlpwf.azureml.remote nlpwf_job.pkl ")
    assert props["distribution"] == {"distributionType": "PyTorch", "processCountPerInstance": 2}
    assert props["resources"]["instanceCount"] == 2
    assert props["computeId"] == f"{prefix}/computes/cpu-d32-v5"
    assert props["codeId"] == f"{prefix}/codes/nlpwf-snapshot/versions/1"
    assert props["environmentId"] == f"{prefix}/environments/nlpwf-cpu/versions/3"
    assert props["environmentVariables"] == {"GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "8",
                                             "TOKENIZERS_PARALLELISM": "false"}
    assert props["outputs"]["checkpoints"]["mode"] == "ReadWriteMount"
    assert props["experimentName"] == "nlpwf" and props["tags"]["job_num"] == "0"
    out = capsys.readouterr().out
    assert f"submitted Azure ML job {job.name}: https://ml.azure.com/runs/{job.name}" in out
    assert "not-a-token" not in out and "Authorization" not in out


AML_COMPUTE = {"type": "Microsoft.MachineLearningServices/workspaces/computes", "location": "westeurope",
               "properties": {"computeType": "AmlCompute", "properties": {
                   "vmSize": "Standard_D32_v5", "scaleSettings": {"minNodeCount": 0, "maxNodeCount": 4}}}}


def test_waiting_on_a_cancelled_job_gives_a_failed_job_return(dry_run, tmp_path):
    """The launcher's submit step on a batch: existing cluster, one PUT, polls until Azure says
    Canceled; the outcome goes into the job's JobReturn."""
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    transport = RecordingTransport(status="Canceled", compute=AML_COMPUTE)
    ws = OmegaConf.create(FAKE_WS)
    ws_client = workspace.connect(ws, credential=FakeCredential(), transport=transport)
    prefix = (f"/subscriptions/{ws.subscription_id}/resourceGroups/{ws.resource_group}"
              f"/providers/Microsoft.MachineLearningServices/workspaces/{ws.workspace_name}")
    spec = yaml.safe_load((dry_run / "azureml" / "job.yaml").read_text())
    spec.update(code=f"azureml:{prefix}/codes/c/versions/1", environment=f"azureml:{prefix}/environments/e/versions/1")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    job = azjob.JobSpec(name=spec["name"], job_dir=tmp_path, job_yaml=tmp_path / "job.yaml",
                        cluster={"name": "cpu-d32-v5", "create_if_missing": False}, vm_size="Standard_D32_v5", nodes=2)
    run = JobReturn(overrides=["nodes=2"], status=JobStatus.COMPLETED, _return_value=job)
    settings = OmegaConf.create({"wait": True, "stream": False, "poll_interval_s": 0.01, "max_parallel": 2})

    [outcome] = submit.execute([job], settings, ws=ws_client)
    launch.settle(run, job, outcome)

    assert run.status == JobStatus.FAILED
    assert f"Azure ML job {spec['name']} ended Canceled" in str(run._return_value)
    methods = [(r.method, r.url.split("?")[0].rsplit("/", 2)[-2]) for r in transport.requests]
    assert methods[0] == ("GET", "computes") and methods.count(("PUT", "jobs")) == 1
    assert ("GET", "jobs") in methods


def test_a_missing_cluster_that_may_not_be_created_fails_the_batch_without_submitting(dry_run, tmp_path):
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    transport = RecordingTransport()
    ws_client = workspace.connect(OmegaConf.create(FAKE_WS), credential=FakeCredential(), transport=transport)
    job = azjob.JobSpec(name="nlpwf-x", job_dir=tmp_path, job_yaml=dry_run / "azureml" / "job.yaml",
                        cluster={"name": "cpu-d32-v5", "create_if_missing": False}, vm_size="Standard_D32_v5", nodes=2)
    outcomes = submit.execute([job, job], OmegaConf.create({"wait": False, "stream": False, "poll_interval_s": 1,
                                                            "max_parallel": 2}), ws=ws_client)
    runs = [JobReturn(status=JobStatus.COMPLETED, _return_value=job) for _ in range(2)]
    for run, outcome in zip(runs, outcomes):
        launch.settle(run, job, outcome)
    assert [r.status for r in runs] == [JobStatus.FAILED, JobStatus.FAILED]
    assert "nothing submitted" in str(outcomes[0]) and "the workspace has no cluster cpu-d32-v5" in str(runs[0]._return_value)
    assert [r.method for r in transport.requests] == ["GET"]


@pytest.fixture
def python_ctrl_c():
    """Python's own SIGINT handler for the test. A shell starts background jobs with SIGINT
    ignored, and Python then installs none, so an inherited disposition would swallow the
    test's Ctrl-C and leave it waiting forever."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.slow  # a real SIGINT, watched for seconds
def test_ctrl_c_stops_watching_promptly_and_leaves_the_jobs_running(dry_run, tmp_path, capsys, python_ctrl_c):
    import os
    import signal
    import threading
    import time

    from omegaconf import OmegaConf

    transport = RecordingTransport(status="Running", compute=AML_COMPUTE)
    ws = OmegaConf.create(FAKE_WS)
    ws_client = workspace.connect(ws, credential=FakeCredential(), transport=transport)
    prefix = (f"/subscriptions/{ws.subscription_id}/resourceGroups/{ws.resource_group}"
              f"/providers/Microsoft.MachineLearningServices/workspaces/{ws.workspace_name}")
    spec = yaml.safe_load((dry_run / "azureml" / "job.yaml").read_text())
    spec.update(code=f"azureml:{prefix}/codes/c/versions/1", environment=f"azureml:{prefix}/environments/e/versions/1")
    subs = []
    for i in range(2):
        spec["name"] = f"nlpwf-test-{i}"
        (tmp_path / f"job{i}.yaml").write_text(yaml.safe_dump(spec))
        subs.append(azjob.JobSpec(name=spec["name"], job_dir=tmp_path, job_yaml=tmp_path / f"job{i}.yaml",
                                  cluster={"name": "cpu-d32-v5"}, vm_size="Standard_D32_v5", nodes=2))
    settings = OmegaConf.create({"wait": True, "stream": False, "poll_interval_s": 600, "max_parallel": 2,
                                 "cancel_on_abort": False})  # cancelling: tests/test_azureml_submit.py
    threading.Timer(5.0, os.kill, (os.getpid(), signal.SIGINT)).start()  # the user's Ctrl-C while both jobs run
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        submit.execute(subs, settings, ws=ws_client)
    assert time.monotonic() - started < 30  # not the 600 s poll interval
    assert "stopped watching: submitted jobs keep running in Azure ML" in capsys.readouterr().out
    deadline = time.monotonic() + 20  # a submission already under way completes; nothing is cancelled in Azure
    while [r.method for r in transport.requests].count("PUT") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [r.method for r in transport.requests].count("PUT") == 2
    assert "DELETE" not in [r.method for r in transport.requests] and not any("cancel" in r.url for r in transport.requests)


@pytest.mark.parametrize("label", ["DRY_RUN", "SUBMITTED"])
def test_the_launcher_labels_jobs_that_did_not_train_here(tmp_path, label):
    """summary.csv says DRY_RUN or SUBMITTED where the launcher knows no result exists yet (the
    label is the launcher's: nothing below it reads the launcher's settings); metrics that came
    back, or a failure, win over the label."""
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from nlpwf.results import summary

    cfg = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path)}, "job": {"num": 0}}})
    run = JobReturn(overrides=["nodes=2"], status=JobStatus.COMPLETED, hydra_cfg=cfg)
    assert summary.row(run, label)["status"] == label and summary.row(run)["status"] == "COMPLETED"
    failed = JobReturn(overrides=["nodes=2"], status=JobStatus.FAILED, hydra_cfg=cfg, _return_value=RuntimeError("x"))
    assert summary.row(failed, label)["status"] == "FAILED"
    (tmp_path / "metrics.json").write_text('{"eval_accuracy": 0.8}')  # results came back: trained
    assert summary.row(run, label)["status"] == "COMPLETED"


def test_threads_follow_the_stages_process_count_and_gloo_interface_is_overridable():
    from omegaconf import OmegaConf

    def cfg(stage):
        return OmegaConf.create({"nodes": 2, "stage": {"name": stage},
                                 "compute": {"name": "d32_v5", "processes_per_node": 2, "cores": 16, "threads_per_process": None}})

    settings = OmegaConf.create({"environment_variables": {}})
    assert azjob.environment_variables(cfg("train"), settings)["OMP_NUM_THREADS"] == "8"      # 2 processes per node
    assert azjob.environment_variables(cfg("evaluate"), settings)["OMP_NUM_THREADS"] == "16"  # one process per node
    assert azjob.layout(cfg("evaluate")) == (1, 1)
    assert azjob.environment_variables(cfg("train"), settings)["GLOO_SOCKET_IFNAME"] == "eth0"
    custom = OmegaConf.create({"environment_variables": {"GLOO_SOCKET_IFNAME": "ib0"}})
    assert azjob.environment_variables(cfg("train"), custom)["GLOO_SOCKET_IFNAME"] == "ib0"
