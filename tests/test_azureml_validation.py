"""Each mistake is caught before anything is submitted, as one line naming the fix."""
from __future__ import annotations

import json

import pytest
from omegaconf import open_dict

from nlpwf.azureml import job as azjob
from nlpwf.errors import UserError

from conftest import compose, run_cli


def composed(*overrides):
    cfg = compose("compute=d32_v5", *overrides, return_hydra_config=True)
    return cfg, cfg.hydra.launcher, cfg.hydra.sweeper._target_


def check(*overrides, edit=None):
    cfg, settings, sweeper = composed(*overrides)
    if edit:
        with open_dict(cfg):
            edit(cfg)
    azjob.validate(cfg, settings, sweeper)


@pytest.mark.parametrize("overrides, edit, message", [
    # nodes x processes: the one check of local and Azure ML jobs alike (config.checks.check_layout)
    (["hydra.launcher.dry_run=true", "nodes=0"], None, "nodes=0: a job needs at least one node, e.g. nodes=1"),
    (["hydra.launcher.dry_run=true", "compute.processes_per_node=0"], None, "compute.processes_per_node=0: use 1 or more"),
    (["hydra.launcher.dry_run=true", "nodes=5"], None, "nodes=5 is above compute.cluster.max_instances=4"),
    (["hydra.launcher.dry_run=true"], lambda c: c.compute.pop("cluster"), "compute=d32_v5 names no Azure ML cluster"),
    (["hydra.launcher.dry_run=true", "compute.cluster.name=9bad_name"], None, "is not a valid AmlCompute name"),
    # the rest of the job's checks (config.checks.check_job) run before it is built, as for a local job
    (["hydra.launcher.dry_run=true", "nodes=two"], None, "nodes='two' must be a whole number"),
    (["hydra.launcher.dry_run=true", "precision.name=fp8"], None, "precision=fp8 is not supported"),
    (["hydra.launcher.dry_run=true", "hydra.launcher.environment.docker_context=/nonexistent/docker"], None,
     "no Dockerfile in the docker build context /nonexistent/docker"),
    (["hydra.launcher.workspace.config_path=/nonexistent/config.json"], None,
     "hydra.launcher.workspace.config_path=/nonexistent/config.json: no such file"),
    (["hydra.launcher.workspace.subscription_id=abc"], None, "hydra.launcher.workspace.resource_group"),
    (["hparams_search=optuna", "hydra.launcher.workspace.subscription_id=a",
      "hydra.launcher.workspace.resource_group=b", "hydra.launcher.workspace.workspace_name=c"], None,
     "this sweeper needs each job's result: add hydra.launcher.wait=true"),
])
def test_validation_errors(overrides, edit, message):
    with pytest.raises(UserError, match=None) as e:
        check(*overrides, edit=edit)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_docker_context_without_dockerfile(tmp_path):
    with pytest.raises(UserError, match="no Dockerfile in the docker build context"):
        check("hydra.launcher.dry_run=true", f"hydra.launcher.environment.docker_context={tmp_path}")
    check("hydra.launcher.dry_run=true", f"hydra.launcher.environment.docker_context={tmp_path}",
          "hydra.launcher.environment.image=registry.example/nlpwf:1")  # an image needs no context


def test_local_data_or_weights_folders_become_inputs_and_missing_ones_are_refused(glue_dir):
    # a local folder is a job input now (tests/test_azureml_inputs.py): accepted
    check("hydra.launcher.dry_run=true", "dataset=mrpc", f"dataset.data_dir={glue_dir}")
    check("hydra.launcher.emulate=true", f"model.source={glue_dir}")
    with pytest.raises(UserError, match=f"dataset.data_dir={glue_dir}/x exists neither on this machine nor as an Azure ML URI"):
        check("hydra.launcher.dry_run=true", "dataset=mrpc", f"dataset.data_dir={glue_dir}/x")
    check("hydra.launcher.dry_run=true", "dataset=mrpc")  # the Hub dataset: read on the nodes
    check("hydra.launcher.dry_run=true", "model=tiny_bert")  # package:... weights ship in the image


def test_config_json_is_searched_in_cwd_and_parents(tmp_path, monkeypatch):
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)
    with pytest.raises(UserError, match="no Azure ML config.json in .* or its parents"):
        check()
    (tmp_path / ".azureml").mkdir()
    (tmp_path / ".azureml" / "config.json").write_text(json.dumps({"subscription_id": "x"}))
    check()  # found two levels up, under .azureml/
    check("hydra.launcher.emulate=true")


def test_cli_reports_a_missing_config_json_in_one_line_and_submits_nothing(tmp_path):
    r = run_cli("compute=d32_v5", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("nlpwf: error:")]
    assert len(errors) == 1 and "no Azure ML config.json" in errors[0], r.stderr[-2000:]
    assert "submitted Azure ML job" not in r.stdout



def test_an_app_other_than_nlpwf_names_its_cluster_in_the_launcher():
    from omegaconf import OmegaConf

    settings = composed("hydra.launcher.dry_run=true")[1]
    app = OmegaConf.create({"foo": 10, "hydra": {"job": {"name": "app"}}})
    with pytest.raises(UserError, match="set hydra.launcher.cluster to the AmlCompute cluster to run it on"):
        azjob.validate(app, settings, None)
    with open_dict(settings):
        settings.cluster = "cpu-small"
    azjob.validate(app, settings, None)
    assert azjob.layout(app) == (1, 1) and azjob.cluster_of(app, settings) == {"name": "cpu-small"}
    env = azjob.environment_variables(app, settings)  # nlpwf's thread settings are for nlpwf's jobs
    assert "OMP_NUM_THREADS" not in env and "TOKENIZERS_PARALLELISM" not in env


@pytest.mark.parametrize("python, refused", [("3.11", False), ("3.12", True)])
def test_a_task_sent_as_bytecode_needs_the_images_python(tmp_path, python, refused):
    """A task pickled by value is bytecode of this Python: the image must run the same major.minor.
    One sent by reference (nlpwf's own task) ships no bytecode and goes to any image."""
    from nlpwf.azureml import payload

    context = tmp_path / "docker"
    context.mkdir()
    (context / "Dockerfile").write_text(f"# the image\nFROM python:{python}-slim-bookworm\nRUN true\n")
    settings = composed("hydra.launcher.dry_run=true", f"hydra.launcher.environment.docker_context={context}")[1]
    local = payload.python_version()
    by_value = payload.Packed(data=b"", by_value=True, task_name="__main__.experiment")
    if refused and python != local:
        with pytest.raises(UserError) as e:
            azjob.check_python(by_value, settings)
        assert f"cannot load: run from a Python {python} environment" in str(e.value) and "\n" not in str(e.value)
        assert "__main__.experiment" in str(e.value)
    else:
        azjob.check_python(by_value, settings)
    azjob.check_python(payload.Packed(data=b"", by_value=False, task_name="nlpwf.cli.main"), settings)
    with open_dict(settings):
        settings.emulate = True  # emulate runs this Python, whatever the image's
    azjob.check_python(by_value, settings)


def test_the_projects_dockerfile_names_its_python():
    from nlpwf.azureml import payload

    settings = composed("hydra.launcher.dry_run=true")[1]
    assert payload.image_python(azjob.docker_context(settings) / "Dockerfile") == "3.11"


@pytest.mark.parametrize("overrides, message", [
    (["logger=wandb"], "logger=wandb: wandb is not in the Azure ML image (docker/)"),
    (["logger=[mlflow,wandb]"], "logger=wandb: wandb is not in the Azure ML image (docker/)"),
    (["stage=quantize"], "stage=quantize: neural-compressor is not in the Azure ML image (docker/)"),
    (["training.torch_compile=true"], "training.torch_compile=true: torch.compile needs a C++ compiler"),
])
def test_settings_the_image_cannot_run_are_refused_before_anything_is_sent(overrides, message):
    with pytest.raises(UserError) as e:
        check("hydra.launcher.dry_run=true", *overrides)
    assert message in str(e.value) and "\n" not in str(e.value)
    # a ready image may carry them: not checked then
    check("hydra.launcher.dry_run=true", "hydra.launcher.environment.image=registry.example/nlpwf:1", *overrides)


def test_the_images_own_settings_pass():
    check("hydra.launcher.dry_run=true", "logger=mlflow")
    check("hydra.launcher.dry_run=true", "logger=none", "training.torch_compile=false")


@pytest.mark.slow  # the CLI contract, a process start
def test_cli_refuses_wandb_on_azure_in_one_line_and_writes_no_job(tmp_path):
    r = run_cli("compute=d32_v5", "logger=wandb", "hydra.launcher.dry_run=true", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                cwd=tmp_path)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("nlpwf: error:")]
    assert len(errors) == 1 and "logger=wandb: wandb is not in the Azure ML image" in errors[0], r.stderr[-2000:]
    assert not list(tmp_path.rglob("job.yaml"))


@pytest.mark.parametrize("setting", ["hydra.launcher.register_model=nlpwf-mrpc", "hydra.launcher.download_model=true"])
def test_what_acts_on_the_finished_job_needs_wait(setting):
    ids = ["hydra.launcher.workspace.subscription_id=a", "hydra.launcher.workspace.resource_group=b",
           "hydra.launcher.workspace.workspace_name=c"]
    with pytest.raises(UserError) as e:
        check(setting, *ids)
    assert "acts on the finished job: add hydra.launcher.wait=true" in str(e.value) and "\n" not in str(e.value)
    check(setting, "hydra.launcher.wait=true", *ids)
