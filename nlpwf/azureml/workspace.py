"""The Azure ML workspace: from Studio's config.json, or from explicit ids.

config.json holds the subscription, resource group and workspace name; none of it (nor any
credential) is printed, logged or copied into a snapshot. Credentials come from
DefaultAzureCredential: `az login`, a managed identity, or AZURE_* environment variables.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from nlpwf.errors import UserError

IDS = ("subscription_id", "resource_group", "workspace_name")


def explicit_ids(ws: DictConfig) -> bool:
    given = [k for k in IDS if ws.get(k)]
    if given and len(given) < len(IDS):
        missing = ", ".join(f"hydra.launcher.workspace.{k}" for k in IDS if k not in given)
        raise UserError(f"the workspace is given by ids but {missing} is missing: set it, or use a config.json instead")
    return bool(given)


def find_config(ws: DictConfig, start: Path | None = None) -> Path:
    """The config.json to use: the configured path, else the first in the current dir or a parent
    (plain or under .azureml/), the places the SDK's MLClient.from_config looks."""
    if ws.get("config_path"):
        path = Path(ws.config_path).expanduser()
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise UserError(f"hydra.launcher.workspace.config_path={ws.config_path}: no such file; download config.json "
                            "from the workspace's page in Azure ML Studio and point config_path at it")
        return path
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        for candidate in (folder / "config.json", folder / ".azureml" / "config.json"):
            if candidate.is_file():
                return candidate
    raise UserError(f"no Azure ML config.json in {here} or its parents: download it from the workspace's page in "
                    "Azure ML Studio, or set hydra.launcher.workspace.config_path (or the three workspace ids)")


def check(ws: DictConfig, start: Path | str | None = None) -> None:
    """The workspace can be named without contacting Azure (raises UserError otherwise).
    `start`: where to look for config.json (default: the current dir)."""
    if not explicit_ids(ws):
        find_config(ws, Path(start) if start else None)


@dataclass
class Workspace:
    """The workspace as nlpwf talks to it: the SDK's MLClient, and what nlpwf's own blob clients
    (storage.py) need beside it: the same credential and the same retry settings."""

    ml_client: Any
    credential: Any
    retry: dict = field(default_factory=dict)


def connect(ws: DictConfig, credential=None, retry: dict | None = None, **kwargs) -> Workspace:
    """The workspace's client. `retry`: azure-core's RetryPolicy settings for every request (see
    retry_kwargs); other kwargs go to the MLClient only (e.g. `transport=` in tests: the blob
    clients then still talk to storage over the network)."""
    from azure.ai.ml import MLClient

    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    retry = dict(retry or {})
    if explicit_ids(ws):
        ml_client = MLClient(credential, ws.subscription_id, ws.resource_group, ws.workspace_name, **retry, **kwargs)
    else:
        ml_client = MLClient.from_config(credential, path=str(find_config(ws)), **retry, **kwargs)
    return Workspace(ml_client, credential, retry)


def retry_kwargs(settings: DictConfig) -> dict:
    """azure-core's RetryPolicy settings for every request, ARM's and blob storage's alike:
    transient errors (408, 429, 5xx, dropped connections) are retried with exponential backoff
    (backoff_factor * 2**(attempt-1) s, or Azure's Retry-After)."""
    out = {}
    for key in ("retry_total", "retry_backoff_factor", "retry_backoff_max"):
        if settings.get(key) is not None:
            out[key] = settings.get(key)
    return out
