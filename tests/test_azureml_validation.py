"""Each mistake is caught before anything is submitted, as one line naming the fix."""
from __future__ import annotations

import json

import pytest
from omegaconf import open_dict

from nlpwf.azureml import job as azjob
from nlpwf.errors import UserError
from tests.conftest import compose, run_cli


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
    (["hydra.launcher.dry_run=true", "nodes=0"], None, "nodes=0: an Azure ML job needs at least one node"),
    (["hydra.launcher.dry_run=true", "compute.processes_per_node=0"], None, "compute.processes_per_node=0: use 1 or more"),
    (["hydra.launcher.dry_run=true", "nodes=5"], None, "nodes=5 is above compute.cluster.max_instances=4"),
    (["hydra.launcher.dry_run=true"], lambda c: c.compute.pop("cluster"), "compute=d32_v5 names no Azure ML cluster"),
    (["hydra.launcher.dry_run=true", "compute.cluster.name=9bad_name"], None, "is not a valid AmlCompute name"),
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


def test_local_data_or_weights_folder_is_rejected(glue_dir):
    with pytest.raises(UserError, match=f"dataset.data_dir={glue_dir} is a folder on this machine"):
        check("hydra.launcher.dry_run=true", "dataset=mrpc", f"dataset.data_dir={glue_dir}")
    with pytest.raises(UserError, match=f"model.source={glue_dir} is a folder on this machine"):
        check("hydra.launcher.emulate=true", f"model.source={glue_dir}")
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

