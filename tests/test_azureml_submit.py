"""After Azure ML accepts a job: bounded waiting, cancelling, results download and model
registration, against azure-core's lowest layer (a transport that records each request and
answers as ARM, the datastore and blob storage do). Nothing here reaches Azure."""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml
from azure.core.rest._http_response_impl import HttpResponseImpl
from azure.core.utils import CaseInsensitiveDict
from omegaconf import OmegaConf

from nlpwf.azureml import job as azjob
from nlpwf.azureml import payload, submit, workspace
from tests.test_azureml_job import AML_COMPUTE, FAKE_WS, FakeCredential, RecordingTransport

PREFIX = (f"/subscriptions/{FAKE_WS['subscription_id']}/resourceGroups/{FAKE_WS['resource_group']}"
          f"/providers/Microsoft.MachineLearningServices/workspaces/{FAKE_WS['workspace_name']}")
ACCOUNT = "https://nlpwfstore.blob.core.windows.net"
CONTAINER = "azureml-blobstore-test"
DATASTORE = {"type": "Microsoft.MachineLearningServices/workspaces/datastores", "properties": {
    "datastoreType": "AzureBlob", "accountName": "nlpwfstore", "containerName": CONTAINER,
    "endpoint": "core.windows.net", "protocol": "https", "isDefault": True,
    "credentials": {"credentialsType": "AccountKey"}}}


def results_uri(job: str) -> str:
    return f"azureml://datastores/workspaceblobstore/paths/azureml/{job}/results/"


class AzureTransport(RecordingTransport):
    """ARM (jobs, computes, datastores, models) and blob storage, as far as these tests go.
    `statuses`: what successive GETs of a job answer (the last one repeats); `failures`: HTTP
    statuses answered instead, one per GET of a job, before the statuses; `blobs`: the
    datastore's blobs (name -> bytes)."""

    def __init__(self, statuses=("Completed",), failures=(), blobs=None, per_job=None):
        super().__init__(compute=AML_COMPUTE)
        self.statuses, self.failures = list(statuses), list(failures)
        self.per_job = per_job or {}  # job name -> its own list of statuses
        self.blobs = blobs or {}
        self.gets: dict[str, int] = {}
        self.lock = threading.Lock()

    def send(self, request, **kwargs):
        with self.lock:
            return self._send(request)

    def _send(self, request):
        url = urllib.parse.urlsplit(request.url)
        if url.netloc.endswith("blob.core.windows.net"):
            self.requests.append(request)
            return self.blob(request, url)
        path = url.path
        if request.method == "PUT" and "/jobs/" in path:
            body = json.loads(request.body)
            name = path.rsplit("/", 1)[1]
            outputs = body["properties"].setdefault("outputs", {})
            outputs.setdefault("results", {"jobOutputType": "uri_folder", "mode": "ReadWriteMount",
                                           "uri": results_uri(name)})
            request.body = json.dumps(body)  # what a job with the results output sends
        if request.method == "GET" and "/jobs/" in path and path in self.jobs:
            self.requests.append(request)
            name = path.rsplit("/", 1)[1]
            n = self.gets[name] = self.gets.get(name, 0) + 1
            if n <= len(self.failures):
                return self.response(request, self.failures[n - 1], {"error": {"code": "ServiceUnavailable",
                                                                              "message": "try again"}})
            statuses = self.per_job.get(name, self.statuses)
            body = json.loads(json.dumps(self.jobs[path]))
            body["properties"]["status"] = statuses[min(n - len(self.failures), len(statuses)) - 1]
            return self.response(request, 200, body)
        if request.method == "POST" and path.endswith("/cancel"):
            self.requests.append(request)
            return self.response(request, 202, {})
        if request.method == "GET" and path.endswith("/datastores/workspaceblobstore"):
            self.requests.append(request)
            return self.response(request, 200, {"id": path, "name": "workspaceblobstore", **DATASTORE})
        if request.method == "POST" and path.endswith("/datastores/workspaceblobstore/listSecrets"):
            self.requests.append(request)
            return self.response(request, 200, {"secretsType": "Sas", "sasToken": "sv=2024-01-01&sig=not-a-sig"})
        if "/models/" in path and request.method == "PUT":
            self.requests.append(request)
            body = json.loads(request.body)
            body.update(id=path, name=path.rsplit("/", 1)[1])
            body["properties"].setdefault("flavors", {})
            return self.response(request, 201, body)
        return super().send(request)

    def blob(self, request, url):
        query = urllib.parse.parse_qs(url.query)
        if query.get("comp") == ["list"]:
            prefix = query.get("prefix", [""])[0]
            items = "".join(f"<Blob><Name>{n}</Name><Properties><Content-Length>{len(b)}</Content-Length>"
                            "<BlobType>BlockBlob</BlobType></Properties></Blob>"
                            for n, b in sorted(self.blobs.items()) if n.startswith(prefix))
            xml = (f'<?xml version="1.0" encoding="utf-8"?><EnumerationResults ServiceEndpoint="{ACCOUNT}/" '
                   f'ContainerName="{CONTAINER}"><Prefix>{prefix}</Prefix><Blobs>{items}</Blobs><NextMarker /></EnumerationResults>')
            return self.raw(request, 200, xml.encode(), {"Content-Type": "application/xml"})
        name = urllib.parse.unquote(url.path.split(f"/{CONTAINER}/", 1)[1])
        data = self.blobs[name]
        first, last = 0, len(data) - 1
        rng = request.headers.get("x-ms-range") or request.headers.get("Range")
        if rng:
            a, b = rng.split("=", 1)[1].split("-")
            first, last = int(a), min(int(b), len(data) - 1)
        chunk = data[first:last + 1]
        return self.raw(request, 206 if rng else 200, chunk, {
            "Content-Type": "application/octet-stream", "Content-Length": str(len(chunk)),
            "Content-Range": f"bytes {first}-{last}/{len(data)}", "x-ms-blob-type": "BlockBlob",
            "ETag": '"0x1"', "Last-Modified": "Mon, 30 Nov 2026 12:00:00 GMT"})

    @staticmethod
    def raw(request, status, content: bytes, headers: dict):
        class Chunks:  # what the blob client reads a download from, piece by piece (it sets attributes on it)
            def __init__(self, pipeline, response, **kwargs):  # as azure-core's StreamDownloadGenerator
                self.response, self.content_length = response, len(content)
                self.pieces = iter([content[i:i + 1024] for i in range(0, len(content), 1024)])

            def __iter__(self):
                return self

            def __next__(self):
                return next(self.pieces)

        chunks = Chunks

        r = HttpResponseImpl(request=request, internal_response=None, status_code=status, reason="",
                             content_type=headers.get("Content-Type"), stream_download_generator=chunks,
                             headers=CaseInsensitiveDict(headers))
        if status != 206 and status != 200 or "xml" in headers.get("Content-Type", ""):
            r._content = content
            r._is_closed = r._is_stream_consumed = True
        return r

    def seen(self):
        """(method, what) of each request: ARM's last two path parts, or the blob's name."""
        out = []
        for r in self.requests:
            url = urllib.parse.urlsplit(r.url)
            if url.netloc.endswith("blob.core.windows.net"):
                q = urllib.parse.parse_qs(url.query)
                out.append((r.method, "list " + q.get("prefix", [""])[0] if q.get("comp") == ["list"]
                            else urllib.parse.unquote(url.path.split(f"/{CONTAINER}/", 1)[1])))
            else:
                out.append((r.method, "/".join(url.path.rsplit("/", 2)[-2:])))
        return out


def client(transport, **kwargs):
    return workspace.client(OmegaConf.create(FAKE_WS), credential=FakeCredential(), transport=transport, **kwargs)


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


def result_blobs(job: str, value=0.25) -> dict:
    import cloudpickle

    root = f"azureml/{job}/results/"
    return {root + "metrics.json": b'{"eval_accuracy": 0.8}', root + "train_log.csv": b"step,loss\n1,0.5\n",
            root + "training_curves.png": b"\x89PNG fake", root + payload.RETURN_FILE: cloudpickle.dumps(value),
            root + "model/config.json": b"{}", root + "model/model.safetensors": b"w" * 5000}


# --- downloads ---------------------------------------------------------------------------------

def test_a_finished_job_brings_back_only_its_small_results_streamed_to_disk(tmp_path):
    [spec] = make_specs(tmp_path)
    blobs = result_blobs(spec.name)
    blobs[f"azureml/{spec.name}/checkpoints/checkpoint-10/optimizer.pt"] = b"o" * 1000  # another output
    transport = AzureTransport(blobs=blobs)

    [outcome] = submit.execute([spec], settings(), ml_client=client(transport))

    assert outcome == 0.25
    got = [what for method, what in transport.seen() if method == "GET" and not what.startswith(("list", "jobs", "computes", "datastores"))]
    root = f"azureml/{spec.name}/results/"
    assert sorted(got) == sorted(root + f for f in ("metrics.json", "train_log.csv", "training_curves.png", payload.RETURN_FILE))
    assert ("GET", f"list {root}") in transport.seen()
    results = spec.job_dir / "azureml" / "outputs"
    assert sorted(p.name for p in results.iterdir()) == sorted(["metrics.json", "train_log.csv", "training_curves.png",
                                                                 payload.RETURN_FILE])
    assert (results / "train_log.csv").read_bytes() == b"step,loss\n1,0.5\n"
    assert json.loads((spec.job_dir / "metrics.json").read_text()) == {"eval_accuracy": 0.8}
    assert not list((spec.job_dir / "azureml").glob(".download-*"))  # the temporary folder is gone


def test_download_model_adds_model_and_checkpoints_stay_in_azure(tmp_path):
    [spec] = make_specs(tmp_path)
    blobs = result_blobs(spec.name)
    blobs[f"azureml/{spec.name}/checkpoints/checkpoint-10/optimizer.pt"] = b"o" * 1000
    transport = AzureTransport(blobs=blobs)

    [outcome] = submit.execute([spec], settings(download_model=True), ml_client=client(transport))

    assert outcome == 0.25
    model = spec.job_dir / "azureml" / "outputs" / "model"
    assert (model / "model.safetensors").read_bytes() == b"w" * 5000  # several 1 KiB pieces, written as they came
    assert (model / "config.json").is_file()
    assert not any("checkpoints" in what for _, what in transport.seen())


def test_an_older_job_without_results_output_brings_back_only_those_files_of_outputs(tmp_path):
    """A job with no `results` output: its ./outputs in the default artifact store, filtered alike."""
    [spec] = make_specs(tmp_path)
    store = f"ExperimentRun/dcid.{spec.name}/"
    blobs = {store + "outputs/" + name.rsplit("/results/", 1)[1]: data for name, data in result_blobs(spec.name).items()}
    blobs[store + "outputs/checkpoint-10/optimizer.pt"] = b"o" * 1000
    blobs[store + "logs/azureml/std_log.txt"] = b"log"
    transport = AzureTransport(blobs=blobs)
    ml_client = client(transport)
    submit.submit_one(ml_client, spec)
    del transport.jobs[next(iter(transport.jobs))]["properties"]["outputs"]["results"]
    uri = f"azureml://datastores/workspaceblobstore/paths/{store}"
    ml_client.jobs._get_named_output_uri = lambda name, output: {output: uri}  # the SDK's run-history lookup

    got = submit.download_results(ml_client, spec, settings())

    assert sorted(got) == sorted("outputs/" + f for f in ("metrics.json", "train_log.csv", "training_curves.png",
                                                          payload.RETURN_FILE))
    assert submit.task_return(spec.job_dir, "x") == 0.25
    assert not list((spec.job_dir / "azureml").glob(".download-*"))


# --- bounded waiting ---------------------------------------------------------------------------

def test_a_job_queued_past_the_limit_is_cancelled_and_reported_in_one_line(tmp_path):
    [spec] = make_specs(tmp_path)
    transport = AzureTransport(statuses=("NotStarted", "Queued"))

    [outcome] = submit.execute([spec], settings(queue_timeout_s=0.05), ml_client=client(transport))

    assert isinstance(outcome, RuntimeError) and "\n" not in str(outcome)
    assert re.search(f"Azure ML job {spec.name} was still (NotStarted|Queued) after hydra.launcher.queue_timeout_s=0.05 "
                     "and was cancelled", str(outcome))
    assert ("POST", f"{spec.name}/cancel") in transport.seen()
    assert not any(what.startswith("list") for _, what in transport.seen())  # nothing downloaded


def test_a_running_job_is_not_cancelled_by_the_queue_limit(tmp_path):
    [spec] = make_specs(tmp_path)
    transport = AzureTransport(statuses=("Queued", "Running", "Running", "Running", "Completed"),
                               blobs=result_blobs(spec.name))
    [outcome] = submit.execute([spec], settings(queue_timeout_s=3600), ml_client=client(transport))
    assert outcome == 0.25 and not any(m == "POST" and w.endswith("/cancel") for m, w in transport.seen())


def test_a_503_is_retried_by_azure_core_and_the_job_is_not_failed(tmp_path):
    [spec] = make_specs(tmp_path)
    transport = AzureTransport(failures=(503,), statuses=("Completed",), blobs=result_blobs(spec.name))
    ml_client = client(transport, **workspace.retry_kwargs(OmegaConf.create({"retry_total": 3, "retry_backoff_factor": 0})))

    [outcome] = submit.execute([spec], settings(transient_errors_max=0), ml_client=ml_client)

    assert outcome == 0.25
    job_gets = [w for m, w in transport.seen() if m == "GET" and w == f"jobs/{spec.name}"]
    assert len(job_gets) >= 2 and transport.gets[spec.name] == len(job_gets)  # the 503, then the answer


def test_a_503_after_azure_cores_retries_is_tolerated_by_the_poll_loop(tmp_path, caplog):
    [spec] = make_specs(tmp_path)
    transport = AzureTransport(failures=(503, 503), statuses=("Running", "Completed"), blobs=result_blobs(spec.name))
    ml_client = client(transport, retry_total=0)

    [outcome] = submit.execute([spec], settings(transient_errors_max=3), ml_client=ml_client)

    assert outcome == 0.25
    assert "transient error (2/3)" in caplog.text


def test_a_non_transient_error_while_polling_still_fails_the_job(tmp_path):
    [spec] = make_specs(tmp_path)
    transport = AzureTransport(failures=(403,), statuses=("Completed",))
    [outcome] = submit.execute([spec], settings(), ml_client=client(transport, retry_total=0))
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

    outcomes = submit.execute(specs, settings(), ml_client=client(transport), abort_on_failure=True)

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


def test_a_failed_job_of_a_sweep_that_goes_on_leaves_its_siblings_running(tmp_path):
    specs = make_specs(tmp_path, 2)
    transport = AzureTransport(per_job={"nlpwf-test-0": ["Running", "Running", "Completed"], "nlpwf-test-1": ["Failed"]},
                               blobs=result_blobs("nlpwf-test-0"))
    outcomes = submit.execute(specs, settings(), ml_client=client(transport), abort_on_failure=False)
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
        submit.execute(specs, settings(poll_interval_s=600), ml_client=client(transport))
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

def test_register_model_puts_the_jobs_model_output_as_a_model_asset(tmp_path, capsys):
    [spec] = make_specs(tmp_path)
    transport = AzureTransport(blobs=result_blobs(spec.name))

    [outcome] = submit.execute([spec], settings(register_model="nlpwf-mrpc"), ml_client=client(transport))

    assert outcome == 0.25
    [put] = [r for r in transport.requests if r.method == "PUT" and "/models/" in r.url]
    assert urllib.parse.urlsplit(put.url).path.endswith("/models/nlpwf-mrpc/versions/1")
    props = json.loads(put.body)["properties"]
    assert props["modelUri"] == f"azureml://jobs/{spec.name}/outputs/results/paths/model"
    assert props["modelType"] == "custom_model" and props["tags"] == {"nlpwf_job": spec.name}
    assert f"registered model nlpwf-mrpc version 1 from Azure ML job {spec.name}" in capsys.readouterr().out
    assert not any("/model/" in w for _, w in transport.seen())  # registered in place: nothing downloaded


def test_a_failed_job_registers_nothing(tmp_path):
    [spec] = make_specs(tmp_path)
    transport = AzureTransport(statuses=("Failed",))
    [outcome] = submit.execute([spec], settings(register_model="nlpwf-mrpc"), ml_client=client(transport))
    assert isinstance(outcome, RuntimeError)
    assert not any("/models/" in r.url for r in transport.requests)
