"""Hydra's own launcher conformance suites, with nlpwf's local launcher (nlpwf_local).

It runs each sweep point's task in this process through Hydra's public run_job, as Hydra's
basic launcher does, so the suites' plain task functions must see exactly what they would see
there: job dirs, `.hydra/`, job numbers and ids, overrides, custom resolvers, working dirs,
task names. nlpwf's own tasks through this launcher: test_multirun.py.
"""
from __future__ import annotations

import csv

from hydra import version
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import BatchedSweeperTestSuite, IntegrationTestSuite, LauncherTestSuite
from pytest import fixture, mark

from hydra_plugins.nlpwf_local_launcher.local_launcher import NlpwfLocalLauncher

LAUNCHER = "nlpwf_local"


@fixture(autouse=True)
def compat_version_base(hydra_restore_singletons):
    """The suites assume Hydra's compatibility version base (1.1: a job runs in its own dir); it is
    process-wide and other test files start Hydra with version_base 1.3 first. Restored afterwards."""
    version.setbase("1.1")


def test_discovered_as_a_launcher_and_not_hydras_basic_one():
    # Discovery executes the plugin modules again: the same class by name, not by identity.
    assert "NlpwfLocalLauncher" in [c.__name__ for c in Plugins.instance().discover(Launcher)]
    # Written on Hydra's public API: not a subclass of its (private) basic launcher.
    assert [c for c in NlpwfLocalLauncher.__mro__ if c.__module__.startswith("hydra._internal")] == []


@mark.parametrize("launcher_name, overrides", [(LAUNCHER, [])])
class TestLocalLauncher(LauncherTestSuite):
    pass


@mark.parametrize("launcher_name, overrides", [(LAUNCHER, ["hydra.sweeper.max_batch_size=2"])])
class TestLocalLauncherBatched(BatchedSweeperTestSuite):
    pass


@mark.parametrize("task_launcher_cfg, extra_flags", [({}, ["-m", f"hydra/launcher={LAUNCHER}"])])
class TestLocalLauncherIntegration(IntegrationTestSuite):
    pass


def test_every_batch_is_added_to_the_sweep_summary(hydra_sweep_runner, tmp_path):
    """Batches of 2 of a 6-point sweep: one summary.csv with every point, in order, each COMPLETED."""
    sweep = hydra_sweep_runner(
        calling_file=None, calling_module="hydra.test_utils.a_module", task_function=None, config_path="configs",
        config_name="compose.yaml", temp_dir=tmp_path,
        overrides=[f"hydra/launcher={LAUNCHER}", "hydra.sweeper.max_batch_size=2", "group1=file1,file2", "bar=100,200,300"],
    )
    with sweep:  # the runner removes its sweep dir on leaving
        assert [len(batch) for batch in sweep.returns] == [2, 2, 2]
        rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["job"] for r in rows] == [str(i) for i in range(6)]
    assert [r["overrides"] for r in rows][:2] == ["group1=file1 bar=100", "group1=file1 bar=200"]
    assert {r["status"] for r in rows} == {"COMPLETED"} and [r["job_dir"] for r in rows] == [str(tmp_path / str(i)) for i in range(6)]
