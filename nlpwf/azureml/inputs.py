"""The data and models an Azure ML job reads: each path key of the job's config that names a
local folder or file, or an Azure ML URI, becomes one of the job's inputs.

PATH_KEYS is the one list of such keys: a key added to nlpwf later is covered by adding it
here. For each key the job's config names:
- a local folder or file (relative paths are from where the user started) becomes an input
  that the launcher uploads at submit (storage.upload: to the workspace's datastore, under a
  content hash, so the same data is stored once) and Azure ML mounts on the nodes
  (`hydra.launcher.input_mode`: ro_mount by default, or download);
- `azureml://datastores/NAME/paths/...` or `azureml:ASSET:VERSION` becomes an input as it is,
  used in place without upload;
- the input's type says what kind of asset it is, which is how the SDK resolves
  `azureml:NAME:VERSION`: `custom_model` for the model keys (MODEL_KEYS: a registered model, or a
  model folder), `uri_folder` / `uri_file` for data;
- `package:NAME` (data shipped in nlpwf's code) and, for model keys, a Hugging Face Hub id stay
  in the config as they are;
- anything else is refused before anything is sent.

The payload carries the config as the launcher composed it, so the nodes learn the mounted
paths from the job's command: `python -m nlpwf.azureml.remote nlpwf_job.pkl
dataset.data_dir=${{inputs.dataset_data_dir}}`; nlpwf.azureml.remote applies them before the task
runs. Keys naming the same path (model.tokenizer is model.source by default) share one input.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nlpwf.errors import UserError

# Every config key whose value may be a path the job reads.
PATH_KEYS = (
    "dataset.data_dir", "dataset.train_file", "dataset.eval_file", "dataset.test_file",
    "model.source", "model.tokenizer",
    "stage.model_path", "stage.input", "stage.file",
)
# Keys naming a model (weights, tokenizer): their inputs are `custom_model`, so the SDK resolves
# azureml:NAME:VERSION as a registered model (as a `uri_folder` it would look up a data asset of that
# name, and the service would reject the job). Their value may also be a Hugging Face Hub id
# (org/name), which the nodes download themselves.
MODEL_KEYS = HUB_KEYS = ("model.source", "model.tokenizer", "stage.model_path")
MODEL_TYPE = "custom_model"
# Keys naming one file; the others name folders (decides the type of an Azure ML URI's input).
FILE_KEYS = ("dataset.train_file", "dataset.eval_file", "dataset.test_file", "stage.input", "stage.file")
# Keys whose relative value is a file in another key's folder (dataset.data_dir): that folder's input carries it.
RELATIVE_TO = {"dataset.train_file": "dataset.data_dir", "dataset.eval_file": "dataset.data_dir",
               "dataset.test_file": "dataset.data_dir"}
MODES = ("ro_mount", "download")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_ASSET = re.compile(r"^azureml:[^/:]+:[^/:]+$")  # azureml:NAME:VERSION (an ARM id has slashes)


@dataclass(frozen=True)
class JobInput:
    name: str            # the input's name in the job: ${{inputs.NAME}}
    keys: tuple          # the config keys that read it
    type: str            # uri_folder | uri_file (data), custom_model (a model key)
    path: str            # absolute local path, or the Azure ML URI
    local: bool          # uploaded by the SDK at submit

    def to_sdk(self, mode: str):
        from azure.ai.ml import Input

        return Input(type=self.type, path=self.path, mode=mode)


def is_azureml_uri(value: str) -> bool:
    return value.startswith("azureml://datastores/") or bool(_ASSET.match(value))


def input_name(key: str) -> str:
    return key.replace(".", "_")


def job_inputs(cfg: DictConfig, cwd: str | Path | None) -> list[JobInput]:
    """The job's inputs, one per distinct path, in PATH_KEYS order; raises UserError (one line)
    for a value that is neither here, nor an Azure ML URI, nor a package or Hub id where allowed."""
    found: dict[str, JobInput] = {}
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or not isinstance(value, str) or not value.strip():
            continue
        if value.startswith("package:"):
            continue
        base = OmegaConf.select(cfg, RELATIVE_TO.get(key, ""), default=None) if key in RELATIVE_TO else None
        if base and not Path(value).expanduser().is_absolute() and not is_azureml_uri(value):
            continue  # read from the base folder's input on the nodes, as here
        if is_azureml_uri(value):
            kind, path, local = input_type(key, is_file=key in FILE_KEYS), value, False
        else:
            here = Path(value).expanduser()
            here = here if here.is_absolute() else Path(cwd or Path.cwd()) / here
            if here.exists():
                kind, path, local = input_type(key, is_file=not here.is_dir()), str(here.resolve()), True
            elif key in HUB_KEYS and _HUB_ID.match(value):
                continue  # a Hub id: the nodes download it
            else:
                allowed = "a local folder or file, azureml://datastores/NAME/paths/PATH or azureml:NAME:VERSION"
                raise UserError(f"{key}={value} exists neither on this machine nor as an Azure ML URI: use {allowed}"
                                + (", a package:NAME or a Hub id" if key in HUB_KEYS else ""))
        if path in found:
            prev = found[path]
            found[path] = JobInput(prev.name, (*prev.keys, key), prev.type, prev.path, prev.local)
        else:
            found[path] = JobInput(input_name(key), (key,), kind, path, local)
    return list(found.values())


def input_type(key: str, is_file: bool) -> str:
    """The input's type: a model asset for model keys, else a data folder or file."""
    if key in MODEL_KEYS:
        return MODEL_TYPE
    return "uri_file" if is_file else "uri_folder"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UserError(f"hydra.launcher.input_mode={mode}: use one of {', '.join(MODES)}")
    return mode


def command_args(inputs: list[JobInput]) -> list[str]:
    """`key=${{inputs.NAME}}` for every key that reads an input (applied on the nodes by remote.py)."""
    return [f"{key}=${{{{inputs.{i.name}}}}}" for i in inputs for key in i.keys]
