"""What an Azure ML job runs: the user's task function, its job's config and Hydra's global
state, pickled into the code snapshot (PAYLOAD_FILE) by the launcher and read back by every
process of the job (nlpwf.azureml.remote). Hydra's remote launchers ship a task the same way.

- The task goes by reference (module and name, imported again on the node) when the node can
  import it: its module is part of the code snapshot, and the module's attribute is the task
  or hydra.main's wrapper around it (functools.wraps leaves the task in `__wrapped__`).
  Anything else (a script's `__main__`, a closure, a callable object) goes by value with
  cloudpickle, which ships bytecode: the node then needs this Python's major.minor.
- The config is the sweep point's, with its run dir pinned to ./outputs, the folder Azure ML
  uploads, and without `.hydra/` (the launcher wrote that into the job dir; several processes
  per node would race on it). Interpolations stay as they are, as the launcher's own job has
  them (`${now:}` keeps the value cached when the sweep started).
- Hydra's global state (Singleton.get_state) carries custom resolvers, Hydra's job runtime and
  its config loader. Two singletons are the node's own instead: the ConfigStore and
  HydraConfig hold the launcher's and the sweeper's dataclasses, which pickle refers to by
  module and the image does not install (they come from Hydra plugins), and run_job needs
  neither (it sets HydraConfig from the job's config); they are pickled by name
  (persistent ids) wherever they are referenced. The launcher and sweeper nodes of the config
  itself go as plain nodes for the same reason. Resolvers the node registers itself (OmegaConf's
  oc.*, Hydra's now, hydra, python_version) stay here too, so a task sent by reference ships
  no bytecode at all.
"""
from __future__ import annotations

import copy
import importlib
import io
import os
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cloudpickle
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from nlpwf import PROJECT_ROOT
from nlpwf.azureml import secrets, snapshot

PAYLOAD_FILE = "nlpwf_job.pkl"   # in the code snapshot, beside the readable nlpwf_job.yaml
REMOTE_RUN_DIR = "outputs"       # Azure ML uploads ./outputs of the working dir when the job ends
RETURN_FILE = "task_return.pkl"  # in the run dir: the task's return value, for the launcher

# Registered on every node by hydra.core.utils.setup_globals (OmegaConf registers its oc.* on import).
HYDRA_RESOLVERS = ("now", "hydra", "python_version")
# Singletons the node uses its own of (see the module's docstring), by persistent id.
NODE_SINGLETONS = {"ConfigStore": ConfigStore, "HydraConfig": HydraConfig}


@dataclass(frozen=True)
class TaskRef:
    """A task the node imports itself: `module.qualname`, unwrapped `unwrap` times."""

    module: str
    qualname: str
    unwrap: int = 0

    def resolve(self) -> Callable:
        obj: Any = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        for _ in range(self.unwrap):
            obj = obj.__wrapped__
        return obj


@dataclass
class Payload:
    task: Any                # a TaskRef, or the task itself (by value)
    config: DictConfig       # the job's sweep config, run dir pinned (remote_config)
    callbacks: Any           # Hydra's job callbacks (hydra.callbacks), run where the task runs
    state: dict              # Singleton.get_state() without the resolvers every node registers itself

    def task_function(self) -> Callable:
        return self.task.resolve() if isinstance(self.task, TaskRef) else self.task


@dataclass(frozen=True)
class Packed:
    data: bytes
    by_value: bool   # code was pickled by value: the node must run the same Python major.minor
    task_name: str


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def task_name(task: Callable) -> str:
    name = getattr(task, "__qualname__", None) or type(task).__qualname__
    return f"{getattr(task, '__module__', None) or type(task).__module__}.{name}"


def importable_from_snapshot(module) -> bool:
    """Whether the nodes import this very file under the module's name: it is in the snapshot, at
    the path the name gives from the snapshot's root (the job's working dir, first on sys.path)."""
    file = getattr(module, "__file__", None)
    if not file or not snapshot.ships(Path(file)):
        return False
    rel = Path(file).resolve().relative_to(PROJECT_ROOT.resolve())
    name = module.__name__.split(".")
    return rel.with_suffix("").parts in (tuple(name), (*name, "__init__"))


def task_reference(task: Callable) -> TaskRef | None:
    """A reference the node can import, or None when the task must go by value."""
    module_name, qualname = getattr(task, "__module__", None), getattr(task, "__qualname__", None)
    if not module_name or module_name == "__main__" or not qualname or "<locals>" in qualname:
        return None
    module = sys.modules.get(module_name)
    if module is None or not importable_from_snapshot(module):
        return None  # e.g. a test module or an installed package: not in the snapshot, maybe not in the image
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    unwrap = 0
    while obj is not task:  # hydra.main's wrapper (and any other functools.wraps) around the task
        obj = getattr(obj, "__wrapped__", None)
        if obj is None:
            return None
        unwrap += 1
    return TaskRef(module_name, qualname, unwrap)


def escaped(value: str) -> str:
    """A command value as an OmegaConf string that reads back as itself (`${{inputs.X}}` is no interpolation)."""
    return str(value).replace("${", "\\${")


def with_node_overrides(config: DictConfig, overrides: list[str]) -> DictConfig:
    """The config as the nodes run it: the job command's `key=value` overrides (the inputs' and
    outputs' `${{...}}` bindings, training.resume) in place of the local values (a local data
    folder has no meaning there). Hydra's own keys are left to remote_config."""
    with read_write(config), open_dict(config):
        for item in overrides:
            key, _, value = item.partition("=")
            if not key.startswith("hydra."):
                OmegaConf.update(config, key, escaped(value), merge=False, force_add=True)
    return config


def relative_source(path: str) -> str:
    """A config source's path without this machine's folders: relative to the project (its conf/ is
    in the snapshot), or nothing."""
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT.resolve()))
    except (ValueError, OSError):
        return ""


def remote_config(sweep_config: DictConfig, overrides: list[str] = ()) -> DictConfig:
    """The job's config as the nodes run it (see the module's docstring), without what only the
    submitting machine needs: the launcher's and sweeper's settings (workspace ids, environment
    variables, local folders), Hydra's own overrides, and this machine's paths (the sweep dir,
    the working dir, which restore() sets on the node, and the config search path)."""
    remote = copy.deepcopy(sweep_config)
    OmegaConf.copy_cache(from_config=sweep_config, to_config=remote)
    with_node_overrides(remote, list(overrides))
    with read_write(remote.hydra), open_dict(remote.hydra):
        remote.hydra.run.dir = REMOTE_RUN_DIR
        remote.hydra.output_subdir = None
        for plugin_node in ("launcher", "sweeper"):
            if OmegaConf.select(remote, f"hydra.{plugin_node}") is not None:
                remote.hydra[plugin_node] = {}
        if OmegaConf.select(remote, "hydra.overrides.hydra") is not None:
            remote.hydra.overrides.hydra = []
        if OmegaConf.select(remote, "hydra.sweep.dir") is not None:
            remote.hydra.sweep.dir = REMOTE_RUN_DIR
        runtime = remote.hydra.get("runtime")
        if runtime is not None:
            runtime.cwd, runtime.output_dir = ".", REMOTE_RUN_DIR
            for source in runtime.get("config_sources") or []:
                if source.get("schema") == "file":
                    source.path = relative_source(source.path)
    return remote


def shipped_state() -> dict:
    """Hydra's global state for the nodes, without GlobalHydra (the submitting machine's config
    loader and search path: run_job on the node needs neither)."""
    state = Singleton.get_state()
    return {
        "instances": {cls: obj for cls, obj in state["instances"].items() if cls is not GlobalHydra},
        "omegaconf_resolvers": {name: r for name, r in state["omegaconf_resolvers"].items()
                                if not name.startswith("oc.") and name not in HYDRA_RESOLVERS},
    }


class PayloadPickler(cloudpickle.Pickler):
    def persistent_id(self, obj: Any) -> str | None:
        return next((name for name, cls in NODE_SINGLETONS.items() if type(obj) is cls), None)


class PayloadUnpickler(pickle.Unpickler):
    def persistent_load(self, pid: str) -> Any:
        return NODE_SINGLETONS[pid].instance()


def pack(task: Callable, sweep_config: DictConfig, callbacks: Any, overrides: list[str] = ()) -> Packed:
    """The payload of one job, pickled. `overrides`: the job command's (job.node_overrides)."""
    ref = task_reference(task)
    state = shipped_state()
    payload = Payload(task=ref or task, config=remote_config(sweep_config, overrides), callbacks=callbacks, state=state)
    # A task that is not in the snapshot may not be installed on the nodes either: its own
    # module goes by value too (cloudpickle otherwise refers to importable modules by name).
    module = sys.modules.get(getattr(task, "__module__", None) or "")
    by_value_module = ref is None and module is not None and module.__name__ != "__main__" and not importable_from_snapshot(module)
    if by_value_module:
        cloudpickle.register_pickle_by_value(module)
    try:
        buffer = io.BytesIO()
        PayloadPickler(buffer, protocol=pickle.DEFAULT_PROTOCOL).dump(payload)
    finally:
        if by_value_module:
            cloudpickle.unregister_pickle_by_value(module)
    return Packed(data=buffer.getvalue(), by_value=ref is None or bool(state["omegaconf_resolvers"]),
                  task_name=task_name(task))


def read(path: Path) -> Payload:
    with open(path, "rb") as f:
        return PayloadUnpickler(f).load()  # the job's own file, written by the launcher that submitted it


def restore(payload: Payload) -> None:
    """The node's process before its task: Hydra's global state (the node's own, with the
    shipped parts over it), the node's working dir as Hydra's original cwd, and the secrets the
    job names, fetched from its Key Vault with the job's identity (secrets.load_into_environ)."""
    secrets.load_into_environ()
    runtime = OmegaConf.select(payload.config, "hydra.runtime")
    if runtime is not None:
        with read_write(runtime), open_dict(runtime):
            runtime.cwd = os.getcwd()
    setup_globals()
    own = Singleton.get_state()
    Singleton.set_state({
        "instances": {**own["instances"], **payload.state["instances"]},
        "omegaconf_resolvers": {**own["omegaconf_resolvers"], **payload.state["omegaconf_resolvers"]},
    })


def write_return(path: Path, value: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(cloudpickle.dumps(value))
    tmp.replace(path)  # a download never sees half a file


def read_return(path: Path) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


_FROM_PYTHON = re.compile(r"^\s*FROM\s+(?:--\S+\s+)*(?:\S+/)?python:(\d+\.\d+)", re.M | re.I)


def image_python(dockerfile: Path) -> str | None:
    """The Python major.minor of an image built from `dockerfile` (its first FROM python:X.Y), or None."""
    match = _FROM_PYTHON.search(Path(dockerfile).read_text())
    return match.group(1) if match else None
