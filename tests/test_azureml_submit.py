"""After Azure ML accepts a job: bounded waiting, cancelling, results download and model
registration. ARM's REST calls go to azure-core's lowest layer (a transport that records each
request and answers as ARM does); blob storage is a real server, Azurite (tests/azurite.py).
Nothing here reaches Azure."""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from nlpwf.azureml import download, payload, submit, workspace
from nlpwf.azureml import job as azjob
from tests import azurite as blobs
from tests.azurite import CONTAINERS, SECRETS, datastore_body
from tests.test_azureml_job import AML_COMPUTE, FAKE_WS, FakeCredential, RecordingTransport

azurite, via_azurite, storage = blobs.azurite, blobs.via_azurite, blobs.storage  # the fixtures

PREFIX = (f"/subscriptions/{FAKE_WS['subscription_id']}/resourceGroups/{FAKE_WS['resource_group']}"
          f"/providers/Microsoft.MachineLearningServices/workspaces/{FAKE_WS['workspace_name']}")


def results_uri(job: str) -> str:
    return f"azureml://datastores/workspaceblobstore/paths/azureml/{job}/results/"


class AzureTransport(RecordingTransport):
    """ARM (jobs, computes, datastores, models), as far as these tests go. `statuses`: what
    successive GETs of a job answer (the last one repeats); `failures`: HTTP statuses answered
    instead, one per GET of a job, before the statuses. `answered`: (time, job, status) of each GET."""

    def __init__(self, statuses=("Completed",), failures=(), per_job=None):
        super().__init__(compute=AML_COMPUTE)
        self.statuses, self.failures = list(statuses), list(failures)
        self.per_job = per_job or {}  # job name -> its own list of statuses
        self.gets: dict[str, int] = {}
        self.answered: list[tuple[float, str, str]] = []
        self.lock = threading.Lock()

    def send(self, request, **kwargs):
        with self.lock:
            return self._send(request)

    def _send(self, request):
        path = urllib.parse.urlsplit(request.url).path
        if request.method == "PUT" and "/jobs/" in path:
            body = json.loads(request.body)
            name = path.rsplit("/", 1)[1]
            outputs = body["properties"].setdefault("outputs", {})
            outputs.setdefault("results", {"jobOutputType": "uri_folder", "mode": "ReadWriteMount",
                                           "uri": results_uri(name)})
            request.body = json.dumps(body)  # what a job with the results output sends
        if request.method == "GET" and "/jobs/" in path and path in self.jobs:
            self.requests.append(request)
            return self.job(request, path)
        if request.method == "POST" and path.endswith("/cancel"):
            self.requests.append(request)
            return self.response(request, 202, {})
        if "/datastores" in path:
            self.requests.append(request)
            return self.datastore(request, path)
        if "/models/" in path and request.method == "PUT":
            self.requests.append(request)
            body = json.loads(request.body)
            body.update(id=path, name=path.rsplit("/", 1)[1])
            body["properties"].setdefault("flavors", {})
            return self.response(request, 201, body)
        return super().send(request)

    def job(self, request, path):
        name = path.rsplit("/", 1)[1]
        n = self.gets[name] = self.gets.get(name, 0) + 1
        if n <= len(self.failures):
            return self.response(request, self.failures[n - 1], {"error": {"code": "ServiceUnavailable",
                                                                          "message": "try again"}})
        statuses = self.per_job.get(name, self.statuses)
        body = json.loads(json.dumps(self.jobs[path]))
        body["properties"]["status"] = statuses[min(n - len(self.failures), len(statuses)) - 1]
        self.answered.append((time.monotonic(), name, body["properties"]["status"]))
        return self.response(request, 200, body)

    def datastore(self, request, path):
        name = path.rsplit("/datastores", 1)[1].strip("/").split("/")[0]
        if request.method == "GET" and not name:  # the list (the default datastore: isDefault=true)
            return self.response(request, 200, {"value": [{"id": f"{PREFIX}/datastores/workspaceblobstore",
                                                            **datastore_body("workspaceblobstore", CONTAINERS["workspaceblobstore"])}]})
        if request.method == "POST" and path.endswith("/listSecrets"):
            return self.response(request, 200, SECRETS)
        return self.response(request, 200, {"id": path, **datastore_body(name, CONTAINERS[name])})

    def seen(self):
        """(method, ARM's last two path parts) of each request."""
        return [(r.method, "/".join(urllib.parse.urlsplit(r.url).path.rsplit("/", 2)[-2:])) for r in self.requests]


def client(transport, **retry):
    return workspace.connect(OmegaConf.create(FAKE_WS), credential=FakeCredential(), retry=retry, transport=transport)


def make_specs(tmp_path: Path, n: int = 1) -> list[azjob.JobSpec]:
    """Jobs as the dry run writes them, with ARM ids for code and environment (no upload)."""
    specs = []
    for i in range(n):
        job_dir = tmp_path / str(i)
        job_dir.mkdir()
        spec = {"$schema": "https://azuremlschemas.azureedge.net/latest/commandJob.schema.json",
                "name": f"nlpwf-test-{i}", "type": "command", "command": azjob.REMOTE_COMMAND,
                "code": f"azureml:{PREFIX}/codes/c/versions/1", "environment": f"azureml:{PREFIX}/environments/e/versions/1",
                "compute": "cpu-d32-v5", "resources": {"instance_count": 1}}
        (job_dir / "job.yaml").write_text(yaml.safe_dump(spec))
        specs.append(azjob.JobSpec(name=spec["name"], job_dir=job_dir, job_yaml=job_dir / "job.yaml",
                                   cluster={"name": "cpu-d32-v5"}, vm_size="Standard_D32_v5"))
    return specs


def settings(**kw):
    base = {"wait": True, "stream": False, "poll_interval_s": 0.01, "max_parallel": 4, "queue_timeout_s": None,
            "transient_errors_max": 3, "cancel_on_abort": True, "download_model": False, "register_model": None}
    return OmegaConf.create({**base, **kw})


def result_blobs(job: str, value=0.25, root: str | None = None) -> dict:
    import cloudpickle

    root = f"azureml/{job}/results/" if root is None else root
    return {root + "metrics.json": b'{"eval_accuracy": 0.8}', root + "train_log.csv": b"step,loss\n1,0.5\n",
            root + "training_curves.png": b"\x89PNG fake", root + payload.RETURN_FILE: cloudpickle.dumps(value),
            root + "model/config.json": b"{}", root + "model/model.safetensors": bytes(range(256)) * 40000}


def completed(tmp_path, storage, **kw):
    """A job that completes with its results in the datastore: (spec, transport, outcome)."""
    [spec] = make_specs(tmp_path)
    blobs = result_blobs(spec.name)
    blobs[f"azureml/{spec.name}/checkpoints/checkpoint-10/optimizer.pt"] = b"o" * 1000  # another output
    storage(blobs)
    transport = AzureTransport()
    [outcome] = submit.execute([spec], settings(**kw), ws=client(transport))
    return spec, transport, outcome


# --- downloads (from Azurite) ------------------------------------------------------------------

def test_a_finished_job_brings_back_only_its_small_results(tmp_path, storage):
    spec, transport, outcome = completed(tmp_path, storage)

    assert outcome == 0.25
    results = spec.job_dir / "azureml" / "outputs"
    assert sorted(p.name for p in results.iterdir()) == sorted(["metrics.json", "train_log.csv", "training_curves.png",
                                                                 payload.RETURN_FILE])
    assert (results / "train_log.csv").read_bytes() == b"step,loss\n1,0.5\n"
    assert json.loads((spec.job_dir / "metrics.json").read_text()) == {"eval_accuracy": 0.8}
    assert not list((spec.job_dir / "azureml").glob(".download-*"))  # the temporary folder is gone
    assert ("POST", "workspaceblobstore/listSecrets") in transport.seen()  # the datastore's key, from ARM


def test_download_model_adds_model_and_checkpoints_stay_in_azure(tmp_path, storage):
    spec, _, outcome = completed(tmp_path, storage, download_model=True)

    assert outcome == 0.25
    model = spec.job_dir / "azureml" / "outputs" / "model"
    assert (model / "model.safetensors").read_bytes() == bytes(range(256)) * 40000  # 10 MB: several chunks
    assert (model / "config.json").is_file()
    assert not list(spec.job_dir.rglob("optimizer.pt"))


def test_an_older_job_without_results_output_brings_back_only_those_files_of_outputs(tmp_path, storage):
    """A job with no `results` output: its ./outputs in the default artifact store, filtered alike."""
    [spec] = make_specs(tmp_path)
    store = f"ExperimentRun/dcid.{spec.name}/"
    blobs = result_blobs(spec.name, root=store + "outputs/")
    blobs[store + "outputs/checkpoint-10/optimizer.pt"] = b"o" * 1000
    blobs[store + "logs/azureml/std_log.txt"] = b"log"
    storage(blobs, "workspaceartifactstore")
    transport = AzureTransport()
    ws = client(transport)
    submit.submit_one(ws.ml_client, spec)
    del transport.jobs[next(iter(transport.jobs))]["properties"]["outputs"]["results"]

    got = download.download_results(ws, spec, settings())

    assert sorted(got) == sorted("outputs/" + f for f in ("metrics.json", "train_log.csv", "training_curves.png",
                                                          payload.RETURN_FILE))
    assert download.task_return(spec.job_dir, "x") == 0.25
    assert not list((spec.job_dir / "azureml").glob(".download-*"))


# --- bounded waiting ---------------------------------------------------------------------------

def test_a_job_queued_past_the_limit_is_cancelled_and_reported_in_one_line(tmp_path):
    [spec] = make_specs(tmp_path)
    transport = AzureTransport(statuses=("NotStarted", "Queued"))

    [outcome] = submit.execute([spec], settings(queue_timeout_s=0.05), ws=client(transport))

    assert isinstance(outcome, RuntimeError) and "\n" not in str(outcome)
    assert re.search(f"Azure ML job {spec.name} was still (NotStarted|Queued) after hydra.launcher.queue_timeout_s=0.05 "
                     "and was cancelled", str(outcome))
    assert ("POST", f"{spec.name}/cancel") in transport.seen()
    assert not any(w.startswith("datastores") for _, w in transport.seen())  # nothing downloaded


def test_a_job_put_back_in_the_queue_after_it_ran_is_followed_not_cancelled(tmp_path, storage):
    """A preempted low-priority job: Queued, Running, then Queued again (for longer than
    queue_timeout_s after its submission), Running, Completed. Followed to its end; no cancel."""
    [spec] = make_specs(tmp_path)
    storage(result_blobs(spec.name))
    requeued = ["Queued"] * 40  # 40 polls of 10 ms: well past the 0.1 s limit
    transport = AzureTransport(statuses=("Queued", "Running", *requeued, "Running", "Completed"))
    started = time.monotonic()

    [outcome] = submit.execute([spec], settings(queue_timeout_s=0.1), ws=client(transport))

    assert outcome == 0.25
    assert not any(m == "POST" and w.endswith("/cancel") for m, w in transport.seen())
    statuses = [status for _, _, status in transport.answered]
    assert statuses[:3] == ["Queued", "Running", "Queued"] and statuses[-1] == "Completed"
    last_queued = max(t for t, _, status in transport.answered if status == "Queued")
    assert last_queued - started > 0.1  # it was seen queued again past the limit, and left alone




def test_a_running_job_is_not_cancelled_by_the_queue_limit(tmp_path, storage):
    [spec] = make_specs(tmp_path)
    storage(result_blobs(spec.name))
    transport = AzureTransport(statuses=("Queued", "Running", "Running", "Running", "Completed"))
    [outcome] = submit.execute([spec], settings(queue_timeout_s=3600), ws=client(transport))
    assert outcome == 0.25 and not any(m == "POST" and w.endswith("/cancel") for m, w in transport.seen())


def test_a_503_is_retried_by_azure_core_and_the_job_is_not_failed(tmp_path, storage):
    [spec] = make_specs(tmp_path)
    storage(result_blobs(spec.name))
    transport = AzureTransport(failures=(503,), statuses=("Completed",))
    ws = client(transport, **workspace.retry_kwargs(OmegaConf.create({"retry_total": 3, "retry_backoff_factor": 0})))

    [outcome] = submit.execute([spec], settings(transient_errors_max=0), ws=ws)

    assert outcome == 0.25
    job_gets = [w for m, w in transport.seen() if m == "GET" and w == f"jobs/{spec.name}"]
    assert len(job_gets) >= 2 and transport.gets[spec.name] == len(job_gets)  # the 503, then the answer


def test_a_503_after_azure_cores_retries_is_tolerated_by_the_poll_loop(tmp_path, caplog, storage):
    [spec] = make_specs(tmp_path)
    storage(result_blobs(spec.name))
    transport = AzureTransport(failures=(503, 503), statuses=("Running", "Completed"))
    [outcome] = submit.execute([spec], settings(transient_errors_max=3), ws=client(transport, retry_total=0))

    assert outcome == 0.25
    assert "transient error (2/3)" in caplog.text


def test_a_non_transient_error_while_polling_still_fails_the_job(tmp_path):
    [spec] = make_specs(tmp_path)
    transport = AzureTransport(failures=(403,), statuses=("Completed",))
    [outcome] = submit.execute([spec], settings(), ws=client(transport, retry_total=0))
    assert isinstance(outcome, RuntimeError) and spec.name in str(outcome)


def test_the_job_time_limit_is_in_the_command_job(tmp_path):
    from omegaconf import OmegaConf as OC

    spec = azjob.JobSpec(name="nlpwf-x", job_dir=Path("."), job_yaml=Path("job.yaml"), cluster={"name": "cpu"})
    hydra_cfg = OC.create({"job": {"name": "app", "num": 0}, "overrides": {"task": []}})
    job = azjob.command_job(spec, OC.create({}), OC.create({"experiment_name": "nlpwf", "timeout_s": 7200}),
                            hydra_cfg, code=".", environment="azureml:e:1")
    assert job.limits.timeout == 7200
    assert dict(job._to_rest_object().properties.limits)["timeout"] == "PT2H"  # what the PUT carries
    job.dump(str(tmp_path / "job.yaml"))  # the dry run's job.yaml keeps it, and loads back
    assert azjob.load(tmp_path / "job.yaml").limits.timeout == 7200
    unlimited = azjob.command_job(spec, OC.create({}), OC.create({"experiment_name": "nlpwf", "timeout_s": None}),
                                  hydra_cfg, code=".", environment="azureml:e:1")
    assert unlimited.limits is None


# --- aborting a sweep --------------------------------------------------------------------------

def test_a_failed_job_of_a_sweep_that_aborts_cancels_its_siblings(tmp_path, capsys):
    specs = make_specs(tmp_path, 3)
    transport = AzureTransport(per_job={"nlpwf-test-0": ["Running"], "nlpwf-test-1": ["Running", "Failed"],
                                        "nlpwf-test-2": ["Queued", "Running"]})

    outcomes = submit.execute(specs, settings(), ws=client(transport), abort_on_failure=True)

    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert "Azure ML job nlpwf-test-1 failed" in str(outcomes[1])
    assert "cancelled, the sweep aborted when job nlpwf-test-1 failed" in str(outcomes[0])
    cancels = sorted(w for m, w in transport.seen() if m == "POST" and w.endswith("/cancel"))
    assert cancels == ["nlpwf-test-0/cancel", "nlpwf-test-2/cancel"]
    # Reported once each: in the batch's cancel line, or by a job whose submission returned after
    # the sweep had stopped (it cancels itself); which one depends on the threads' timing.
    out = capsys.readouterr().out
    listed = re.search(r"cancelled Azure ML job\(s\) ([\w, -]+)", out)
    reported = (listed.group(1).split(", ") if listed else []) + re.findall(r"cancelled Azure ML job (\S+): submitted as", out)
    assert sorted(reported) == ["nlpwf-test-0", "nlpwf-test-2"], out


def test_a_failed_job_of_a_sweep_that_goes_on_leaves_its_siblings_running(tmp_path, storage):
    specs = make_specs(tmp_path, 2)
    storage(result_blobs("nlpwf-test-0"))
    transport = AzureTransport(per_job={"nlpwf-test-0": ["Running", "Running", "Completed"], "nlpwf-test-1": ["Failed"]})
    outcomes = submit.execute(specs, settings(), ws=client(transport), abort_on_failure=False)
    assert outcomes[0] == 0.25 and isinstance(outcomes[1], RuntimeError)
    assert not any(w.endswith("/cancel") for _, w in transport.seen())


@pytest.mark.parametrize("overrides, aborts", [
    (["hparams_search=optuna"], True),                                   # Optuna's default max_failure_rate 0.0
    (["hparams_search=optuna", "hydra.sweeper.max_failure_rate=0.5"], False),
    ([], False),                                                         # the basic sweeper runs every point
])
def test_the_sweeper_says_whether_a_failure_aborts_the_sweep(overrides, aborts):
    from hydra.core.hydra_config import HydraConfig

    from conftest import compose

    cfg = compose(*overrides, return_hydra_config=True)
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    try:
        assert submit.aborts_on_failure() is aborts
    finally:
        HydraConfig.instance().cfg = previous


@pytest.fixture
def python_ctrl_c():
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_cancels_the_running_jobs(tmp_path, capsys, python_ctrl_c):
    import os
    import signal

    specs = make_specs(tmp_path, 2)
    transport = AzureTransport(statuses=("Running",))
    sent = threading.Event()

    def interrupt():
        deadline = time.monotonic() + 60
        while [m for m, _ in transport.seen()].count("PUT") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        sent.set()
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        submit.execute(specs, settings(poll_interval_s=600), ws=client(transport))
    assert sent.is_set()

    def cancels():
        return sorted(w for m, w in transport.seen() if m == "POST" and w.endswith("/cancel"))

    deadline = time.monotonic() + 30  # a submission under way at Ctrl-C cancels its own job when it returns
    while len(cancels()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cancels() == ["nlpwf-test-0/cancel", "nlpwf-test-1/cancel"]  # each once
    out = capsys.readouterr().out
    assert "stopped watching" in out and "cancelled Azure ML job" in out


# --- registering the model ---------------------------------------------------------------------

def test_register_model_puts_the_jobs_model_output_as_a_model_asset(tmp_path, capsys, storage):
    [spec] = make_specs(tmp_path)
    storage(result_blobs(spec.name))
    transport = AzureTransport()

    [outcome] = submit.execute([spec], settings(register_model="nlpwf-mrpc"), ws=client(transport))

    assert outcome == 0.25
    [put] = [r for r in transport.requests if r.method == "PUT" and "/models/" in r.url]
    assert urllib.parse.urlsplit(put.url).path.endswith("/models/nlpwf-mrpc/versions/1")
    props = json.loads(put.body)["properties"]
    assert props["modelUri"] == f"azureml://jobs/{spec.name}/outputs/results/paths/model"
    assert props["modelType"] == "custom_model" and props["tags"] == {"nlpwf_job": spec.name}
    assert f"registered model nlpwf-mrpc version 1 from Azure ML job {spec.name}" in capsys.readouterr().out
    assert not (spec.job_dir / "azureml" / "outputs" / "model").exists()  # registered in place: nothing downloaded


def test_a_failed_job_registers_nothing(tmp_path):
    [spec] = make_specs(tmp_path)
    transport = AzureTransport(statuses=("Failed",))
    [outcome] = submit.execute([spec], settings(register_model="nlpwf-mrpc"), ws=client(transport))
    assert isinstance(outcome, RuntimeError)
    assert not any("/models/" in r.url for r in transport.requests)
