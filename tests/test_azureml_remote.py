"""The task on the nodes: what the launcher ships in the payload, and how the job's command
(`python -m nlpwf.azureml.remote nlpwf_job.pkl`) runs it and reports its outcome.

Emulated jobs of plain Hydra apps (Hydra's test configs, closures as tasks): nothing trains, so
these are quick; nlpwf's own task in an emulated job: test_azureml_emulate.py.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nlpwf.azureml import payload, remote
from nlpwf.errors import JobFailed, UserError
from nlpwf.results import files

OVERRIDES = ["hydra/launcher=nlpwf_azureml", "hydra.launcher.emulate=true", "hydra.launcher.cluster=cpu-test"]


@pytest.fixture
def sweep_of(hydra_sweep_runner, hydra_restore_singletons, tmp_path):
    """A one-point sweep of Hydra's test app (foo: 10, bar: 100) running `task` in an emulated job."""
    from hydra import version

    version.setbase("1.3")  # restored after the test

    def make(task, *overrides):
        return hydra_sweep_runner(calling_file=None, calling_module="hydra.test_utils.a_module", task_function=task,
                                  config_path="configs", config_name="compose.yaml", temp_dir=tmp_path / "sweep",
                                  overrides=[*OVERRIDES, *overrides])
    return make


@pytest.mark.slow  # an emulated job
def test_the_task_runs_in_the_emulated_job_not_in_the_launcher(sweep_of):
    def task(cfg):
        from hydra.core.hydra_config import HydraConfig

        return {"pid": os.getpid(), "argv0": sys.argv[0], "rank": os.environ.get("RANK"), "cwd": os.getcwd(),
                "output_dir": HydraConfig.get().runtime.output_dir, "foo": cfg.foo,
                "sdk_loaded": "azure.ai.ml" in sys.modules}

    with sweep_of(task) as sweep:
        [run] = sweep.returns[0]
        seen = run.return_value
        job_dir = Path(run.hydra_cfg.hydra.runtime.output_dir)  # Hydra's job dir, made here
        node = job_dir / "azureml" / "emulate" / "node-0"
        results = job_dir / "azureml" / "named_outputs" / "results"
        assert seen["pid"] != os.getpid() and seen["argv0"].endswith(os.path.join("nlpwf", "azureml", "remote.py"))
        assert seen["rank"] == "0" and seen["foo"] == 10
        # the node's working dir is its snapshot copy; the run dir is the process's own folder on the
        # node's disk, not the job's results output (a blob mount), which gets the finished run dir
        assert seen["cwd"] == str(node) and seen["output_dir"] == str(node / remote.LOCAL_RUNS / "rank-0")
        assert seen["sdk_loaded"] is False  # the image has no Azure SDK: the nodes' path must not need it
        assert (job_dir / ".hydra" / "overrides.yaml").is_file() and (job_dir / "a_module.log").is_file()
        # published with a marker last, listing the run dir's files: the task's return value and rank 0's log
        assert set(files.listed(results)) == {payload.RETURN_FILE, "a_module.log"}
        # collected like a download of the results output, with the task's return value; the node dirs are gone
        assert (job_dir / "azureml" / "outputs" / payload.RETURN_FILE).is_file() and not node.exists()
        assert not (results / ".hydra").exists()  # the nodes write no .hydra/


def test_a_failing_task_fails_the_job_with_its_traceback_in_the_log(sweep_of, capsys):
    """run_job catches the task's exception; the job must still exit non-zero, or Azure ML would
    report a failed task as a completed job."""
    def task(cfg):
        raise ValueError("the task's own failure")

    with pytest.raises(JobFailed, match=r"the emulated Azure ML job nlpwf-\S+ exited with code 1 "):
        with sweep_of(task):
            pass
    out = capsys.readouterr().out
    assert "[rank 0] ValueError: the task's own failure" in out and "[rank 0] Traceback" in out


def test_a_task_exiting_for_bad_input_passes_its_exit_code_through(sweep_of, capsys):
    """nlpwf's task exits 2 on bad input (after one `nlpwf: error:` line): the job's exit code is 2
    and the launcher reads it as the job rejecting its input, and ends the launch the same way."""
    def task(cfg):
        sys.exit(UserError.exit_code)

    with pytest.raises(SystemExit) as exited:
        with sweep_of(task):
            pass
    assert exited.value.code == UserError.exit_code
    assert re.search(r"nlpwf: error: the emulated Azure ML job nlpwf-\S+ rejected the job's input", capsys.readouterr().err)


# --- what the emulated nodes get, and refuse ------------------------------------------------------

def test_nodes_start_with_only_the_allow_listed_environment(sweep_of, monkeypatch):
    """An allow-list: Azure's documented contract, the MLflow run's variables, the job's own and
    PATH; not the launching shell's (a canary set here), not HOME. The shell Azure runs the command
    with sets PWD and OLDPWD."""
    monkeypatch.setenv("NLPWF_SHELL_CANARY", "must not reach the nodes")

    def _environ(cfg):
        """The variables this process started with (its /proc environ, before Python touched any)."""
        raw = Path("/proc/self/environ").read_bytes().split(b"\0")
        return sorted(item.split(b"=", 1)[0].decode() for item in raw if item)

    with sweep_of(_environ, "+hydra.launcher.environment_variables.JOBVAR=from-the-job") as sweep:
        [run] = sweep.returns[0]
        started_with = set(run.return_value)
    assert started_with == {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "RANK", "LOCAL_RANK",
                            "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
                            "GLOO_SOCKET_IFNAME", "JOBVAR", "PATH", "PWD", "OLDPWD"}


def test_the_job_logs_into_the_mlflow_run_created_for_it_on_a_real_server(sweep_of):
    from mlflow.tracking import MlflowClient

    def _log_to_the_jobs_run(cfg):
        import mlflow

        given = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME")}
        with mlflow.start_run(run_id=given["MLFLOW_RUN_ID"]):  # what nlpwf's tracker does on Azure
            mlflow.log_metric("loss", 0.25, step=3)
            mlflow.log_param("foo", cfg.foo)
        return given

    with sweep_of(_log_to_the_jobs_run) as sweep:
        [run] = sweep.returns[0]
        seen = run.return_value
    assert seen["MLFLOW_TRACKING_URI"].startswith("http://")  # a tracking server, not a file store
    client = MlflowClient(tracking_uri=seen["MLFLOW_TRACKING_URI"])
    logged = client.get_run(seen["MLFLOW_RUN_ID"])
    assert logged.data.metrics["loss"] == 0.25 and logged.data.params["foo"] == "10"
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "loss")] == [3]
    assert client.get_experiment(logged.info.experiment_id).name == seen["MLFLOW_EXPERIMENT_NAME"] == "nlpwf"
    assert logged.info.status == "FINISHED" and logged.data.tags["azureml.job_name"].startswith("nlpwf-")


def test_output_mounts_refuse_what_blobfuse_cannot_do(sweep_of):
    def _try_on_the_mount(cfg):
        """What the task may do in its results output (a blob mount): each attempt, allowed or refused."""
        import errno

        from nlpwf.azureml import payload as node_payload
        from nlpwf.results import files as node_files

        mount = Path(next(a for a in sys.argv if a.startswith("hydra.run.dir=")).partition("=")[2])
        (mount / "f").write_text("x")
        (mount / "d").mkdir()
        here = Path("local.txt")
        here.write_text("x")

        def attempt(action):
            try:
                action()
                return "allowed"
            except PermissionError as e:
                return "refused" if "not supported on a blob mount" in str(e) and e.errno in (None, errno.EPERM) else repr(e)

        return {
            "chmod": attempt(lambda: os.chmod(mount / "f", 0o600)),
            "chmod outside": attempt(lambda: os.chmod(here, 0o600)),
            "rename folder": attempt(lambda: os.rename(mount / "d", mount / "d2")),
            "library renames a file": attempt(lambda: os.replace(mount / "f", mount / "g")),
            "nlpwf renames a file": attempt(lambda: node_payload.write_return(mount / "r.pkl", 1)),
            "nlpwf's atomic write": attempt(lambda: node_files.write_json(mount / "m.json", {})),
            "hard link": attempt(lambda: os.link(mount / "g", mount / "h")),
            "nlpwf publishes": attempt(lambda: node_files.publish(here.parent, mount / "published", ["local.txt"])),
        }

    with sweep_of(_try_on_the_mount) as sweep:
        [run] = sweep.returns[0]
        outcome = run.return_value
        results = Path(run.hydra_cfg.hydra.runtime.output_dir) / "azureml" / "named_outputs" / "results"
        assert files.listed(results / "published") == {"local.txt": 1}  # written through to the datastore
    assert outcome == {"chmod": "refused", "chmod outside": "allowed", "rename folder": "refused",
                       "library renames a file": "allowed", "nlpwf renames a file": "refused",
                       "nlpwf's atomic write": "refused", "hard link": "refused", "nlpwf publishes": "allowed"}


def test_task_references(tmp_path):
    from nlpwf import cli, stages

    # hydra.main's wrapper is the module's attribute; the task is behind its __wrapped__
    assert payload.task_reference(cli.main.__wrapped__) == payload.TaskRef("nlpwf.cli", "main", unwrap=1)
    assert payload.TaskRef("nlpwf.cli", "main", unwrap=1).resolve() is cli.main.__wrapped__
    assert payload.task_reference(stages.run) == payload.TaskRef("nlpwf.stages", "run", unwrap=0)

    def closure(cfg):
        return 1

    assert payload.task_reference(closure) is None  # by value
    assert payload.task_reference(test_task_references) is None  # a test module is not in the snapshot
    # in the snapshot, but not importable under its name from the snapshot's root (launchers/ is not on sys.path)
    from hydra_plugins.nlpwf_local_launcher.local_launcher import NlpwfLocalLauncher

    assert payload.task_reference(NlpwfLocalLauncher.launch) is None


def test_a_custom_resolver_goes_by_value_and_hydras_own_stay_on_the_node(hydra_restore_singletons):
    """Resolvers the node registers itself are not shipped (no bytecode for a task by reference);
    a custom one is, and makes the payload need the same Python."""
    from hydra.core.utils import setup_globals

    from nlpwf import cli

    setup_globals()
    config = OmegaConf.create({"x": "${my_custom_resolver:}", "hydra": {"run": {"dir": "here"}, "output_subdir": ".hydra"}})
    plain = payload.pack(cli.main.__wrapped__, config, callbacks=None)
    assert not plain.by_value and payload.shipped_state()["omegaconf_resolvers"] == {}
    OmegaConf.register_new_resolver("my_custom_resolver", lambda: "foo")
    custom = payload.pack(cli.main.__wrapped__, config, callbacks=None)
    assert custom.by_value and list(payload.shipped_state()["omegaconf_resolvers"]) == ["my_custom_resolver"]


def test_the_shipped_config_pins_the_run_dir_and_keeps_the_sweep_start_time(hydra_restore_singletons):
    from hydra.core.utils import setup_globals

    setup_globals()
    config = OmegaConf.create({"stamp": "${now:%H-%M-%S-%f}",
                               "hydra": {"run": {"dir": "runs/${now:%H-%M-%S-%f}"}, "output_subdir": ".hydra",
                                         "launcher": {"dry_run": True}}})
    stamp = config.stamp  # evaluated once, when the sweep started (the resolver caches it in the config)
    remote = payload.remote_config(config)
    assert remote.hydra.run.dir == "outputs" and remote.hydra.output_subdir is None
    assert remote.stamp == stamp and config.hydra.run.dir.startswith("runs/")
    assert OmegaConf.get_type(remote.hydra.launcher) is dict
