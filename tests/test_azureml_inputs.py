"""A job's data and models as Azure ML inputs: which config keys become inputs, how the nodes see
them, and the exact requests of a submission with a local data folder (upload included)."""
from __future__ import annotations

import json
import urllib.parse
from functools import partial

import pytest
import yaml
from azure.ai.ml import load_job
from omegaconf import OmegaConf

from nlpwf.azureml import inputs, launch, payload, remote, submit, workspace
from nlpwf.azureml.inputs import JobInput
from nlpwf.azureml.job import JobSpec
from nlpwf.errors import UserError
from tests.test_azureml_job import FAKE_WS, FakeCredential, RecordingTransport

from conftest import pairs, run_cli, write_glue


def cfg(**values):
    c = OmegaConf.create({"dataset": {}, "model": {}, "stage": {}})
    for key, value in values.items():
        OmegaConf.update(c, key.replace("__", "."), value)
    return c


def test_every_path_key_is_in_the_one_list():
    assert inputs.PATH_KEYS == ("dataset.data_dir", "dataset.train_file", "dataset.eval_file", "dataset.test_file",
                                "model.source", "model.tokenizer", "stage.model_path", "stage.input", "stage.file")


def test_local_paths_uris_packages_and_hub_ids(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "test.csv").write_text("a,b\n")
    found = inputs.job_inputs(cfg(dataset__data_dir="data", dataset__test_file=str(tmp_path / "test.csv"),
                                  model__source="org/model", model__tokenizer="package:x",
                                  stage__input="azureml://datastores/blobs/paths/in/x.csv",
                                  stage__model_path="azureml:my-model:3"), cwd=tmp_path)
    assert [(i.name, i.keys, i.type, i.path, i.local) for i in found] == [
        ("dataset_data_dir", ("dataset.data_dir",), "uri_folder", str((tmp_path / "data").resolve()), True),
        ("dataset_test_file", ("dataset.test_file",), "uri_file", str((tmp_path / "test.csv").resolve()), True),
        ("stage_model_path", ("stage.model_path",), "uri_folder", "azureml:my-model:3", False),
        ("stage_input", ("stage.input",), "uri_file", "azureml://datastores/blobs/paths/in/x.csv", False),
    ]
    assert inputs.command_args(found)[0] == "dataset.data_dir=${{inputs.dataset_data_dir}}"


def test_keys_naming_the_same_folder_share_one_input(tmp_path):
    found = inputs.job_inputs(cfg(model__source=str(tmp_path), model__tokenizer=str(tmp_path)), cwd=None)
    assert [(i.name, i.keys) for i in found] == [("model_source", ("model.source", "model.tokenizer"))]
    assert inputs.command_args(found) == ["model.source=${{inputs.model_source}}", "model.tokenizer=${{inputs.model_source}}"]


@pytest.mark.parametrize("key", ["dataset.data_dir", "stage.input"])
def test_a_path_that_exists_nowhere_is_one_line(tmp_path, key):
    with pytest.raises(UserError, match=rf"^{key}=nope/x exists neither on this machine nor as an Azure ML URI: "):
        inputs.job_inputs(cfg(**{key.replace(".", "__"): "nope/x"}), cwd=tmp_path)


def test_remote_applies_the_commands_overrides():
    c = OmegaConf.create({"dataset": {"data_dir": "/here/data"}, "hydra": {"run": {"dir": "outputs"}}, "checkpoint_dir": None})
    OmegaConf.set_readonly(c.hydra, True)
    remote.apply_overrides(c, ["dataset.data_dir=/mnt/azureml/inputs/x", "hydra.run.dir=/mnt/out/results",
                               "checkpoint_dir=/mnt/out/ckpt", "training.resume=auto"])
    assert c.dataset.data_dir == "/mnt/azureml/inputs/x" and c.hydra.run.dir == "/mnt/out/results"
    assert c.checkpoint_dir == "/mnt/out/ckpt" and c.training.resume == "auto"


# --- a sweep of two points on a local data folder, dry run, then submitted ----------------------------

@pytest.fixture(scope="module")
def two_points(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("inputs")
    data = cwd / "mrpc"
    data.mkdir()
    write_glue(data / "train.tsv", pairs(8))
    write_glue(data / "dev.tsv", pairs(4, start=50))
    sweep = cwd / "sweep"
    r = run_cli("-m", "experiment=mrpc_minilm", "dataset.data_dir=mrpc", "compute=d32_v5", "nodes=2",
                "training.learning_rate=1e-5,2e-5", "hydra.launcher.dry_run=true", f"hydra.sweep.dir={sweep}", cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return data, [sweep / "0", sweep / "1"]


def test_dry_run_declares_the_data_folder_as_an_input(two_points):
    data, job_dirs = two_points
    job = load_job(job_dirs[0] / "azureml" / "job.yaml")
    assert job._validate().passed
    [(name, job_input)] = job.inputs.items()
    assert (name, job_input.type, job_input.mode, job_input.path) == ("dataset_data_dir", "uri_folder", "ro_mount", str(data))
    assert job.command.split()[4] == "dataset.data_dir=${{inputs.dataset_data_dir}}"
    # the payload keeps the local path; the command points the nodes at the mount
    assert payload.read(job_dirs[0] / "azureml" / "snapshot" / payload.PAYLOAD_FILE).config.dataset.data_dir == "mrpc"


def test_download_mode_is_selectable(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    write_glue(data / "train.tsv", pairs(8))
    write_glue(data / "dev.tsv", pairs(4, start=50))
    r = run_cli("experiment=mrpc_minilm", f"dataset.data_dir={data}", "compute=d32_v5", "hydra.launcher.dry_run=true",
                "hydra.launcher.input_mode=download", f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_job(tmp_path / "s" / "0" / "azureml" / "job.yaml").inputs["dataset_data_dir"].mode == "download"


def test_a_missing_data_folder_is_refused_before_anything_is_written(tmp_path):
    r = run_cli("experiment=mrpc_minilm", "dataset.data_dir=no/such/dir", "compute=d32_v5", "hydra.launcher.dry_run=true",
                f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert r.returncode == 2
    assert "dataset.data_dir=no/such/dir exists neither on this machine nor as an Azure ML URI" in r.stderr
    assert not (tmp_path / "s" / "0" / "azureml" / "job.yaml").exists()


class Storage(RecordingTransport):
    """The workspace (ARM, as RecordingTransport) plus its default datastore and that datastore's
    blob container, in memory: blobs are stored on PUT, answered on HEAD, their metadata kept."""

    ACCOUNT = "nlpwfteststore"
    CONTAINER = "azureml-blobstore-test"

    def __init__(self):
        super().__init__()
        self.blobs: dict[str, dict] = {}

    def send(self, request, **kwargs):
        url = urllib.parse.urlsplit(request.url)
        if url.hostname == f"{self.ACCOUNT}.blob.core.windows.net":
            self.requests.append(request)
            blob = urllib.parse.unquote(url.path).split(f"/{self.CONTAINER}/", 1)[1]
            query = urllib.parse.parse_qs(url.query)
            if request.method == "PUT" and query.get("comp") == ["metadata"]:
                if blob not in self.blobs:
                    return self.blob_response(request, 404)
                self.blobs[blob]["metadata"] = {k[len("x-ms-meta-"):]: v for k, v in request.headers.items()
                                                if k.lower().startswith("x-ms-meta-")}
                return self.blob_response(request, 200)
            if request.method == "PUT":
                self.blobs[blob] = {"body": bytes(request.body or b""), "metadata": {}}
                return self.blob_response(request, 201)
            if request.method == "HEAD" and blob in self.blobs:
                meta = {f"x-ms-meta-{k}": v for k, v in self.blobs[blob]["metadata"].items()}
                return self.blob_response(request, 200, {"Content-Length": str(len(self.blobs[blob]["body"])), **meta})
            return self.blob_response(request, 404, {"x-ms-error-code": "BlobNotFound"})
        arm_id = request.url.split("?")[0].split("management.azure.com", 1)[-1]
        if request.method == "GET" and arm_id.endswith("/datastores/workspaceblobstore"):
            self.requests.append(request)
            return self.response(request, 200, {"id": arm_id, "name": "workspaceblobstore", "properties": {
                "datastoreType": "AzureBlob", "accountName": self.ACCOUNT, "containerName": self.CONTAINER,
                "endpoint": "core.windows.net", "protocol": "https", "isDefault": True,
                "credentials": {"credentialsType": "Sas"}}})
        if request.method == "POST" and arm_id.endswith("/datastores/workspaceblobstore/listSecrets"):
            self.requests.append(request)
            return self.response(request, 200, {"secretsType": "Sas", "sasToken": "sv=2024-01-01&sig=not-a-signature"})
        return super().send(request, **kwargs)

    @staticmethod
    def blob_response(request, status, headers=None):
        from azure.core.rest._http_response_impl import HttpResponseImpl
        from azure.core.utils import CaseInsensitiveDict

        h = CaseInsensitiveDict({"ETag": '"0x1"', "Last-Modified": "Mon, 30 Nov 2026 12:00:00 GMT",
                                 "x-ms-request-id": "1", "x-ms-version": "2025-01-05", **(headers or {})})
        if status == 201:
            h["Content-MD5"] = ""
        r = HttpResponseImpl(request=request, internal_response=None, status_code=status, reason="",
                             content_type="application/xml", stream_download_generator=None, headers=h)
        r._content = b""
        r._is_closed = r._is_stream_consumed = True
        return r


def test_two_points_upload_the_local_folder_once_and_put_jobs_that_read_it(two_points, monkeypatch, capsys):
    import azure.ai.ml._artifacts._blob_storage_helper as blob_helper
    from azure.storage.blob import BlobServiceClient

    data, job_dirs = two_points
    transport = Storage()
    # The SDK builds its upload client (azure-storage-blob) without the MLClient's transport: give it ours.
    monkeypatch.setattr(blob_helper, "BlobServiceClient", partial(BlobServiceClient, transport=transport))
    ws = OmegaConf.create(FAKE_WS)
    ml_client = workspace.client(ws, credential=FakeCredential(), transport=transport)
    prefix = (f"/subscriptions/{ws.subscription_id}/resourceGroups/{ws.resource_group}"
              f"/providers/Microsoft.MachineLearningServices/workspaces/{ws.workspace_name}")
    specs = []
    for job_dir in job_dirs:  # the code and environment as ARM ids: only the data is uploaded here
        spec = yaml.safe_load((job_dir / "azureml" / "job.yaml").read_text())
        spec.update(code=f"azureml:{prefix}/codes/c/versions/1", environment=f"azureml:{prefix}/environments/e/versions/1")
        (job_dir / "azureml" / "job.yaml").write_text(yaml.safe_dump(spec))
        specs.append(JobSpec(name=spec["name"], job_dir=job_dir, job_yaml=job_dir / "azureml" / "job.yaml",
                             cluster={"name": "cpu-d32-v5"}, nodes=2, processes_per_node=2,
                             inputs=[JobInput("dataset_data_dir", ("dataset.data_dir",), "uri_folder", str(data), True)]))

    uploaded = launch.upload_inputs(ml_client, specs)
    for spec in specs:
        submit.submit_one(ml_client, spec)

    [uri] = uploaded.values()
    assert list(uploaded) == [str(data)]
    assert uri.startswith("azureml://datastores/workspaceblobstore/paths/LocalUpload/") and uri.endswith("/mrpc")
    blob_puts = [r for r in transport.requests if r.method == "PUT" and "blob.core.windows.net" in r.url
                 and "comp=metadata" not in r.url]
    # each local file once, with its bytes, though two jobs read the folder
    sent = {urllib.parse.unquote(urllib.parse.urlsplit(r.url).path).rsplit("/", 1)[1]: bytes(r.body) for r in blob_puts}
    assert len(blob_puts) == 2 and sent == {"train.tsv": (data / "train.tsv").read_bytes(),
                                           "dev.tsv": (data / "dev.tsv").read_bytes()}
    assert all(urllib.parse.unquote(r.url).split("?")[0].endswith(f"{uri.split('/paths/', 1)[1]}/{name}")
               for r, name in zip(blob_puts, sent))
    job_puts = [r for r in transport.requests if r.method == "PUT" and "/jobs/" in r.url]
    assert len(job_puts) == 2
    for put, spec in zip(job_puts, specs):
        props = json.loads(put.body)["properties"]
        assert props["inputs"] == {"dataset_data_dir": {"jobInputType": "uri_folder", "mode": "ReadOnlyMount", "uri": uri}}
        assert "dataset.data_dir=${{inputs.dataset_data_dir}}" in props["command"]
        assert "hydra.run.dir=${{outputs.results}}" in props["command"]
        assert "checkpoint_dir=${{outputs.checkpoints}}" in props["command"]
        assert props["outputs"]["results"] == {"jobOutputType": "uri_folder", "mode": "ReadWriteMount"}
        assert props["outputs"]["checkpoints"] == {
            "jobOutputType": "uri_folder", "mode": "ReadWriteMount",
            "uri": f"azureml://datastores/workspaceblobstore/paths/nlpwf/checkpoints/{spec.name}/"}
    out = capsys.readouterr()
    assert "not-a-signature" not in out.out + out.err
