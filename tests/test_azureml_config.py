"""Selecting an Azure compute option selects the Azure ML launcher (and MULTIRUN, since Hydra
calls launchers only then); `launcher=local` on the command line keeps the job here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher

from nlpwf.azureml import job as azjob

from conftest import CONF_DIR, PROJECT_ROOT, compose

LAUNCHER_TARGET = "hydra_plugins.nlpwf_azureml_launcher.azureml_launcher.NlpwfAzureMLLauncher"

AZURE_OPTIONS = {"d32_v5": "Standard_D32_v5", "d32s_v6": "Standard_D32s_v6", "d32as_v6": "Standard_D32as_v6"}
# What each size's hosts compute natively (Azure's size pages: Dv5 is Ice Lake, Sapphire Rapids or
# Emerald Rapids by host; Dsv6 Emerald Rapids; Dasv6 AMD Genoa): (native bf16, AMX).
NATIVE = {"d32_v5": ("mixed", "mixed"), "d32s_v6": (True, True), "d32as_v6": (True, False)}


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


def test_every_azure_compute_option_is_listed():
    options = {p.stem for p in (CONF_DIR / "compute").glob("*.yaml")} - {"local"}
    assert options == set(AZURE_OPTIONS) == set(NATIVE)


def _yes_no(value) -> str:
    return {True: "yes", False: "no", "mixed": "mixed"}[value]


@pytest.mark.parametrize("option", sorted(AZURE_OPTIONS))
def test_compute_option_says_what_cpu_it_is_and_docs_agree(option):
    """Each option states its CPU family and native bf16 / AMX (true, false or mixed by host), and
    docs/azureml.md's table of compute options says the same, with the option's cores."""
    cfg = compose(f"compute={option}")
    c = cfg.compute
    assert c.cpu and (c.native_bf16, c.amx) == NATIVE[option]
    assert c.vcpus == 2 * c.cores  # Azure runs these sizes with 2 vCPUs (threads) per physical core
    rows = [line for line in (PROJECT_ROOT / "docs" / "azureml.md").read_text().splitlines()
            if line.startswith(f"| `{option}` |")]
    assert len(rows) == 1, f"docs/azureml.md has no single table row for {option}"
    _, _, vm_size, _family, shape, bf16, amx, vnni, precision, layout, _ = rows[0].split("|")
    assert vm_size.strip() == c.vm_size
    assert shape.strip() == f"{c.vcpus} / {c.cores} / {c.memory_gb} GiB"
    assert bf16.strip().startswith(_yes_no(c.native_bf16)) and amx.strip().startswith(_yes_no(c.amx))
    assert vnni.strip() == "yes"
    # bf16 is what fits only where every host computes it natively; elsewhere auto decides per job
    assert precision.strip().startswith("`bf16`" if c.native_bf16 is True else "`auto`")
    assert layout.strip() == f"{c.processes_per_node} processes × {azjob.omp_threads(cfg)} threads"


@pytest.mark.parametrize("option", sorted(AZURE_OPTIONS))
def test_missing_cluster_is_created_with_the_options_vm_size(option):
    """The cluster nlpwf creates on first use (submit.ensure_cluster) is of the option's VM size."""
    from azure.ai.ml.entities import AmlCompute
    from azure.core.exceptions import ResourceNotFoundError
    from omegaconf import OmegaConf

    from nlpwf.azureml import submit

    created = []

    class Computes:
        def get(self, name):
            raise ResourceNotFoundError(f"no compute {name}")

        def begin_create_or_update(self, compute):
            created.append(compute)
            return type("Poller", (), {"result": lambda self: compute})()

    cfg = compose(f"compute={option}", "nodes=2")
    submit.ensure_cluster(type("Client", (), {"compute": Computes()})(),
                          OmegaConf.to_container(cfg.compute.cluster), cfg.compute.vm_size, cfg.nodes)
    [cluster] = created
    assert isinstance(cluster, AmlCompute)
    assert (cluster.name, cluster.size) == (cfg.compute.cluster.name, AZURE_OPTIONS[option])
    assert (cluster.min_instances, cluster.max_instances) == (0, 4)


@pytest.mark.slow  # a CLI dry run; the size table is checked in-process above
def test_dry_run_on_the_amd_size(tmp_path):
    """`python -m nlpwf compute=d32as_v6 nodes=2 precision=bf16 hydra.launcher.dry_run=true`: the
    job goes to the Genoa cluster, 2 processes per node with 8 OpenMP threads each (16 cores / 2),
    and the config it ships names the VM size the cluster is created with."""
    from azure.ai.ml import load_job

    from conftest import run_cli

    (tmp_path / "config.json").write_text(json.dumps({
        "subscription_id": "11111111-2222-3333-4444-555555555555", "resource_group": "rg", "workspace_name": "ws"}))
    sweep = tmp_path / "sweep"
    r = run_cli("compute=d32as_v6", "nodes=2", "precision=bf16", "hydra.launcher.dry_run=true",
                f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    job_dir = Path(sweep, "0")
    job = load_job(job_dir / "azureml" / "job.yaml")
    assert job.compute == "cpu-d32as-v6" and job.resources.instance_count == 2
    assert job.distribution.process_count_per_instance == 2
    assert job.environment_variables["OMP_NUM_THREADS"] == "8"
    assert job._validate().passed
    resolved = (job_dir / "azureml" / "snapshot" / "nlpwf_job.yaml").read_text()
    assert "vm_size: Standard_D32as_v6" in resolved and "precision:\n  name: bf16" in resolved


# --- the Azure ML SDK: public API only, in the range that is tested ------------------------------

def sdk_private_uses() -> list[str]:
    """Private names of Azure's SDKs that nlpwf/azureml uses: imports of private modules or names,
    and `._name` attributes of anything but nlpwf's own objects (`self`) and the standard library's."""
    import ast
    import sys

    from nlpwf import PROJECT_ROOT

    found = []
    for path in sorted((PROJECT_ROOT / "nlpwf" / "azureml").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("azure"):
                names = [node.module, *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("azure")]
            elif isinstance(node, ast.Attribute) and not (isinstance(node.value, ast.Name) and (
                    node.value.id == "self" or node.value.id in sys.stdlib_module_names)):  # e.g. sys._getframe: Python's
                names = [node.attr]
            else:
                continue
            for name in names:
                if any(part.startswith("_") and not part.startswith("__") for part in name.split(".")):
                    found.append(f"{path.name}:{node.lineno}: {name}")
    return found


def test_nlpwf_uses_no_private_name_of_azures_sdks():
    assert sdk_private_uses() == []


def test_azure_ai_ml_is_pinned_to_the_tested_minor_release():
    import configparser
    import importlib.metadata

    from packaging.requirements import Requirement

    from nlpwf import PROJECT_ROOT

    setup = configparser.ConfigParser()
    setup.read(PROJECT_ROOT / "setup.cfg")
    installed = importlib.metadata.version("azure-ai-ml")
    for extra in ("azure", "dev"):
        [line] = [x for x in setup["options.extras_require"][extra].splitlines() if x.strip().startswith("azure-ai-ml")]
        spec = Requirement(line.strip()).specifier
        assert any(s.operator == "<" for s in spec), f"{extra}: {line} is open above"
        assert spec.contains(installed), f"the tests run azure-ai-ml {installed}, outside {extra}'s {line}"
