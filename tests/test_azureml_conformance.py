"""Hydra's own launcher conformance suites, with the Azure ML launcher in emulate mode.

These suites run plain Hydra task functions (closures, in-process apps), which cannot be
shipped to Azure without pickling them; the launcher runs such tasks through Hydra's
run_job here, and the suites check what the launcher owns for every task: job dirs, job
numbers and ids, overrides, sweep dirs, custom resolvers, working dirs, task names.
nlpwf's own task (test_azureml_emulate.py) is what becomes an Azure ML job.
"""
from __future__ import annotations

from pytest import fixture, mark

from hydra import version
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

LAUNCHER = "nlpwf_azureml"
OVERRIDES = ["hydra.launcher.emulate=true"]


@fixture(autouse=True)
def compat_version_base(hydra_restore_singletons):
    """The suites assume Hydra's compatibility version base (1.1: a job runs in its own dir); it is
    process-wide and other test files start Hydra with version_base 1.3 first. Restored afterwards."""
    version.setbase("1.1")


@mark.parametrize("launcher_name, overrides", [(LAUNCHER, OVERRIDES)])
class TestAzureMLLauncher(LauncherTestSuite):
    pass


@mark.parametrize("task_launcher_cfg, extra_flags", [({}, ["-m", f"hydra/launcher={LAUNCHER}", *OVERRIDES])])
class TestAzureMLLauncherIntegration(IntegrationTestSuite):
    pass
