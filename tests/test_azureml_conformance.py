"""Hydra's own launcher conformance suites, with the Azure ML launcher in emulate mode.

The suites' plain task functions (closures, callable objects, the functions of scripts they
write) are what the emulated Azure ML job runs: the launcher pickles each one into the job's
payload, and `python -m nlpwf.azureml.remote` runs it in the emulated node's working dir, in
another process. The suites check what a launcher owns: job dirs, job numbers and ids,
overrides, sweep dirs, custom resolvers, return values, working dirs, task names.

These apps are not nlpwf's: they name their cluster with hydra.launcher.cluster and run as one
node with one process. A task's working dir is where the emulated job runs it: with
hydra.job.chdir=true, its run dir: its process's own folder on the node's disk
(<job dir>/azureml/emulate/node-0/.nlpwf_runs/rank-0, see nlpwf.azureml.remote), which is then
published to the job's `results` output; the integration suite's hook for apps run elsewhere
(get_test_app_working_dir) says so.
"""
from __future__ import annotations

import os
from pathlib import Path

from hydra import version
from hydra.test_utils.launcher_common_tests import BatchedSweeperTestSuite, IntegrationTestSuite, LauncherTestSuite
from omegaconf import OmegaConf
from pytest import fixture, mark

from nlpwf.azureml import emulate, job, remote

LAUNCHER = "nlpwf_azureml"
OVERRIDES = ["hydra.launcher.emulate=true", "hydra.launcher.cluster=cpu-test"]


@fixture(autouse=True)
def compat_version_base(hydra_restore_singletons):
    """The suites assume Hydra's compatibility version base (1.1: a job runs in its own dir); it is
    process-wide and other test files start Hydra with version_base 1.3 first. Restored afterwards."""
    version.setbase("1.1")


@mark.parametrize("launcher_name, overrides", [(LAUNCHER, OVERRIDES)])
class TestAzureMLLauncher(LauncherTestSuite):
    pass


@mark.slow  # an emulated job per point, as the suite above does
@mark.parametrize("launcher_name, overrides", [(LAUNCHER, [*OVERRIDES, "hydra.sweeper.max_batch_size=2"])])
class TestAzureMLLauncherBatched(BatchedSweeperTestSuite):
    pass


class EmulatedWorkingDirs:
    """What the suite joins a job dir to (`app_dir / "cli_dir/cli_dir_0"`): the working dir the
    task of that job had with chdir, rank 0's run dir on node 0's disk."""

    def __init__(self, tmpdir: Path) -> None:
        self.tmpdir = Path(tmpdir)

    def __truediv__(self, job_dir: str) -> Path:
        return self.tmpdir / job_dir / job.AZURE_DIR / emulate.SCRATCH_DIR / "node-0" / remote.LOCAL_RUNS / "rank-0"


# Each case starts an app process that starts the emulated job's processes: end to end, slow.
# The launcher's own logic is in the suites above, run in this process (only the emulated job's
# task runs in another).
@mark.slow
@mark.parametrize("task_launcher_cfg, extra_flags", [({}, ["-m", f"hydra/launcher={LAUNCHER}", *OVERRIDES])])
class TestAzureMLLauncherIntegration(IntegrationTestSuite):
    @fixture(autouse=True)
    def _app_dirs(self, request, tmpdir):
        request.instance.app_dirs = EmulatedWorkingDirs(tmpdir)

    def get_test_app_working_dir(self) -> EmulatedWorkingDirs:
        return self.app_dirs

    def test_to_absolute_path_multirun(self, tmpdir: Path, task_launcher_cfg, extra_flags) -> None:
        """The suite's version expects relative paths from the folder the launch started in. On
        Azure ML that folder is on another machine: Hydra's original cwd on a node is the job's
        working dir there (the code snapshot; payload.restore sets it), which is where a job's
        relative paths can be found. Emulated, the node's working dir is
        <job dir>/azureml/emulate/node-0."""
        from hydra.test_utils.test_utils import integration_test

        overrides = [*extra_flags, "hydra.job.chdir=True", "hydra.sweep.dir=cli_dir",
                     "hydra.sweep.subdir=cli_dir_${hydra.job.num}"]
        job_dir = Path(tmpdir) / "cli_dir" / "cli_dir_0"
        node_dir = job_dir / job.AZURE_DIR / emulate.SCRATCH_DIR / "node-0"
        integration_test(tmpdir=Path(tmpdir), task_config=OmegaConf.create(task_launcher_cfg or {}), overrides=overrides,
                         prints=["hydra.utils.to_absolute_path('foo/bar')", "os.getcwd()"],
                         expected_outputs=[os.path.realpath(node_dir / "foo/bar"), str(self.app_dirs / "cli_dir/cli_dir_0")])
