"""Selecting an Azure compute option selects the Azure ML launcher (and MULTIRUN, since Hydra
calls launchers only then); `launcher=local` on the command line keeps the job here."""
from __future__ import annotations

import pytest
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher

from nlpwf.azureml import job as azjob

from conftest import compose

LAUNCHER_TARGET = "hydra_plugins.nlpwf_azureml_launcher.azureml_launcher.NlpwfAzureMLLauncher"

AZURE_OPTIONS = {"d32_v5": "Standard_D32_v5", "d32s_v6": "Standard_D32s_v6"}


def test_launcher_is_discovered_by_hydra():
    names = [f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)]
    assert LAUNCHER_TARGET in names


@pytest.mark.parametrize("option", sorted(AZURE_OPTIONS))
def test_azure_compute_selects_azure_launcher_in_multirun(option):
    cfg = compose(f"compute={option}", return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == LAUNCHER_TARGET
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.runtime.choices.launcher == "azureml"
    assert cfg.compute.vm_size == AZURE_OPTIONS[option]
    assert (cfg.compute.vcpus, cfg.compute.cores, cfg.compute.memory_gb) == (32, 16, 128)
    assert cfg.compute.cluster.name and cfg.compute.cluster.min_instances == 0
    # one OMP thread per physical core, none shared between processes
    assert azjob.omp_threads(cfg) * cfg.compute.processes_per_node == cfg.compute.cores
    assert azjob.environment_variables(cfg, cfg.hydra.launcher)["OMP_NUM_THREADS"] == str(azjob.omp_threads(cfg))


@pytest.mark.parametrize("order", [("compute=d32_v5", "launcher=local"), ("launcher=local", "compute=d32_v5")])
def test_launcher_local_on_the_command_line_wins(order):
    cfg = compose(*order, "nodes=2", return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("NlpwfLocalLauncher")
    assert str(cfg.hydra.mode) != "RunMode.MULTIRUN"  # runs as a plain job unless --multirun
    assert cfg.compute.name == "d32_v5" and cfg.nodes == 2 and cfg.compute.processes_per_node == 2


def test_default_stays_local():
    cfg = compose(return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("NlpwfLocalLauncher")
    assert str(cfg.hydra.mode) != "RunMode.MULTIRUN"


def test_launcher_settings_defaults():
    launcher = compose("compute=d32_v5", return_hydra_config=True).hydra.launcher
    assert (launcher.wait, launcher.dry_run, launcher.emulate) == (False, False, False)
    assert launcher.environment.docker_context == "docker" and launcher.environment.image is None
    assert launcher.cluster is None and launcher.emulate_dir is None  # nlpwf's compute options name the cluster


def test_cli_with_launcher_local_runs_here_as_a_plain_run(tmp_path):
    """No --multirun: the Azure option with launcher=local is a plain run (outputs/, not multirun/).
    nodes=0 stops it at the input checks, before any process starts."""
    from conftest import run_cli

    r = run_cli("compute=d32_v5", "launcher=local", "nodes=0", cwd=tmp_path)
    assert r.returncode == 2
    assert "nlpwf: error: nodes=0" in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "outputs").is_dir() and not (tmp_path / "multirun").exists()
