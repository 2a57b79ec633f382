"""A job's data and models as Azure ML inputs: which config keys become inputs, how the nodes see
them, and the exact requests of a submission with a local data folder (upload included)."""
from __future__ import annotations

import json

import pytest
import yaml
from azure.ai.ml import load_job
from omegaconf import OmegaConf

from nlpwf.azureml import inputs, launch, payload, remote, submit
from nlpwf.azureml.inputs import JobInput
from nlpwf.azureml.job import JobSpec
from nlpwf.azureml.storage import upload as storage_upload
from nlpwf.errors import UserError
from tests import azurite as blobs
from tests.azurite import KEY
from tests.test_azureml_submit import PREFIX, AzureTransport, client

from conftest import pairs, run_cli, write_glue

azurite, via_azurite, storage = blobs.azurite, blobs.via_azurite, blobs.storage  # the fixtures


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
        ("stage_model_path", ("stage.model_path",), "custom_model", "azureml:my-model:3", False),
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
    # the payload holds the input's binding, not the local folder; the command points the nodes at the mount
    assert payload.read(job_dirs[0] / "azureml" / "snapshot" / payload.PAYLOAD_FILE).config.dataset.data_dir == \
        "${{inputs.dataset_data_dir}}"


@pytest.mark.slow  # one more CLI dry run for one field
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


def arm_ids(job_yaml):
    """The dry run's job with ARM ids for code and environment: only the inputs are resolved at submit."""
    spec = yaml.safe_load(job_yaml.read_text())
    spec.update(code=f"azureml:{PREFIX}/codes/c/versions/1", environment=f"azureml:{PREFIX}/environments/e/versions/1")
    job_yaml.write_text(yaml.safe_dump(spec))
    return spec


def test_a_registered_model_is_a_model_asset_input(tmp_path):
    """The issue's command: model.source=azureml:my-bert:3 is a custom_model input in job.yaml,
    which load_job loads, and which the SDK resolves as a registered *model* (not a data asset)."""
    sweep = tmp_path / "sweep"
    r = run_cli("experiment=quickstart", "compute=d32_v5", "nodes=2", "model.source=azureml:my-bert:3",
                "hydra.launcher.dry_run=true", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    job_yaml = sweep / "0" / "azureml" / "job.yaml"
    assert yaml.safe_load(job_yaml.read_text())["inputs"] == {
        "model_source": {"mode": "ro_mount", "path": "azureml:my-bert:3", "type": "custom_model"}}
    job = load_job(job_yaml)
    assert job._validate().passed and job.inputs["model_source"].type == "custom_model"
    assert "model.source=${{inputs.model_source}} model.tokenizer=${{inputs.model_source}}" in job.command
    spec = arm_ids(job_yaml)
    transport = AzureTransport()
    submit.submit_one(client(transport).ml_client, JobSpec(name=spec["name"], job_dir=tmp_path, job_yaml=job_yaml,
                                                          cluster={"name": "cpu-d32-v5"}))
    [put] = [r for r in transport.requests if r.method == "PUT"]
    assert json.loads(put.body)["properties"]["inputs"] == {"model_source": {
        "jobInputType": "custom_model", "mode": "ReadOnlyMount", "uri": f"{PREFIX}/models/my-bert/versions/3"}}


def test_two_points_upload_the_local_folder_once_to_azurite_and_put_jobs_that_read_it(two_points, storage, capsys):
    data, job_dirs = two_points
    transport = AzureTransport()
    ws = client(transport)
    specs = []
    for job_dir in job_dirs:
        spec = arm_ids(job_dir / "azureml" / "job.yaml")
        specs.append(JobSpec(name=spec["name"], job_dir=job_dir, job_yaml=job_dir / "azureml" / "job.yaml",
                             cluster={"name": "cpu-d32-v5"}, nodes=2, processes_per_node=2,
                             inputs=[JobInput("dataset_data_dir", ("dataset.data_dir",), "uri_folder", str(data), True)]))

    uploaded = launch.upload_inputs(ws, specs)
    for spec in specs:
        submit.submit_one(ws.ml_client, spec)

    [uri] = uploaded.values()
    assert list(uploaded) == [str(data)]
    assert uri.startswith("azureml://datastores/workspaceblobstore/paths/LocalUpload/") and uri.endswith("/mrpc/")
    folder = uri.split("/paths/", 1)[1]
    blobs = storage.blobs()
    assert {name: body for name, (body, _) in blobs.items() if name.startswith(folder)} == {
        folder + "train.tsv": (data / "train.tsv").read_bytes(), folder + "dev.tsv": (data / "dev.tsv").read_bytes()}
    job_puts = [r for r in transport.requests if r.method == "PUT" and "/jobs/" in r.url]
    assert len(job_puts) == 2
    for put, spec in zip(job_puts, specs):
        props = json.loads(put.body)["properties"]
        assert props["inputs"] == {"dataset_data_dir": {"jobInputType": "uri_folder", "mode": "ReadOnlyMount", "uri": uri}}
        assert "dataset.data_dir=${{inputs.dataset_data_dir}}" in props["command"]
        assert "hydra.run.dir=${{outputs.results}}" in props["command"]
        assert "checkpoint_dir=${{outputs.checkpoints}}" in props["command"]
        assert props["outputs"]["checkpoints"] == {
            "jobOutputType": "uri_folder", "mode": "ReadWriteMount",
            "uri": f"azureml://datastores/workspaceblobstore/paths/nlpwf/checkpoints/{spec.name}/"}
    # Uploaded again (another run, the same content): found whole by its marker, nothing rewritten.
    assert storage_upload(ws, data) == uri
    assert storage.blobs() == blobs
    out = capsys.readouterr()
    assert KEY not in out.out + out.err


def test_a_local_model_folder_is_uploaded_and_read_as_a_model_input(tmp_path, storage):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    [found] = inputs.job_inputs(cfg(model__source=str(model)), cwd=None)
    assert (found.type, found.local) == ("custom_model", True)
    uri = storage_upload(client(AzureTransport()), model)
    assert uri.endswith("/my-model/")
    assert storage.blobs()[uri.split("/paths/", 1)[1] + "config.json"][0] == b'{"model_type": "bert"}'
