"""Secrets stay out of what a job sends and of every file a dry run writes; the job fetches
them itself from a Key Vault (nlpwf.azureml.secrets)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from azure.core.credentials import AccessToken

from nlpwf.azureml import payload, secrets
from nlpwf.errors import UserError
from tests.test_azureml_job import FAKE_WS, RecordingTransport

from conftest import assert_one_line_error, pairs, run_cli, write_glue

CANARY = "hf_canaryTOKEN0123456789abcdefghijklm"  # the shape of a real one: hf_ and 34 letters or digits


def every_file(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


@pytest.mark.parametrize("mode", ["hydra.launcher.dry_run=true", "hydra.launcher.emulate=true"])
def test_a_credential_in_the_jobs_environment_is_refused_before_anything_is_written(tmp_path, mode):
    """The issue's command: +hydra.launcher.environment_variables.HF_TOKEN=hf_... is one line,
    exit 2, and no file anywhere holds the value (nothing at all is written), dry run or emulated."""
    before = every_file(tmp_path)
    r = run_cli("experiment=quickstart", "compute=d32_v5", "nodes=2", mode,
                f"+hydra.launcher.environment_variables.HF_TOKEN={CANARY}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                cwd=tmp_path)
    line = assert_one_line_error(r, "hydra.launcher.environment_variables.HF_TOKEN", "hydra.launcher.key_vault=",
                                 "+hydra.launcher.secrets.HF_TOKEN=")
    assert CANARY not in r.stdout + r.stderr and CANARY not in line
    assert every_file(tmp_path) == before and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("name, value, why", [
    ("HF_TOKEN", "x", "name"), ("WANDB_API_KEY", "x", "name"), ("DB_PASSWORD", "x", "name"),
    ("AZURE_CLIENT_SECRET", "x", "name"), ("STORAGE_CONNECTION_STRING", "x", "name"), ("GITHUB_TOKEN", "x", "name"),
    ("MY_SETTING", "hf_abcdefghijklmnopqrstuvwxyzABCDEFGH", "value"), ("MY_SETTING", "AKIAABCDEFGHIJKLMNOP", "value"),
    ("MY_SETTING", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig", "value"),
    ("MY_SETTING", "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=abc==", "value"),
    ("MY_SETTING", "https://a.blob.core.windows.net/c?sv=2024&sig=abcdefghijklmnop", "value"),
    ("OMP_NUM_THREADS", "8", None), ("TOKENIZERS_PARALLELISM", "false", None), ("GLOO_SOCKET_IFNAME", "eth0", None),
    ("HF_HUB_OFFLINE", "1", None), ("KEYBOARD_LAYOUT", "us", None),
    ("HF_DATASETS_CACHE", "/tmp/pytest-of-root/hf_datasets0", None),  # a path, not an hf_ token
])
def test_what_looks_like_a_credential(name, value, why):
    assert secrets.credential_like(name, value) == why


def test_the_launcher_refuses_it_for_nlpwfs_jobs_too():
    with pytest.raises(UserError) as e:
        secrets.refuse_credentials({"OMP_NUM_THREADS": "8", "X": CANARY})
    assert "hydra.launcher.environment_variables.X: its value looks like a credential" in str(e.value)
    assert CANARY not in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def dry_run_with_data(tmp_path_factory):
    """A dry run of a job reading a local data folder, with workspace ids and Key Vault secrets
    given on the command line: what may reach the snapshot."""
    cwd = tmp_path_factory.mktemp("canary-cwd")
    data = cwd / "my-local-data"
    data.mkdir()
    write_glue(data / "train.tsv", pairs(8))
    write_glue(data / "dev.tsv", pairs(4, start=50))
    sweep = cwd / "sweep"
    ids = {k: f"canary-{k}" for k in FAKE_WS}
    r = run_cli("experiment=quickstart", "dataset=mrpc", "dataset.data_dir=my-local-data", "compute=d32_v5", "nodes=2",
                "hydra.launcher.dry_run=true", f"hydra.sweep.dir={sweep}",
                *[f"hydra.launcher.workspace.{k}={v}" for k, v in ids.items()],
                "hydra.launcher.key_vault=https://canary-vault.vault.azure.net",
                "+hydra.launcher.secrets.HF_TOKEN=hf-token", cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd, sweep / "0", ids


def test_the_snapshot_holds_no_workspace_ids_and_no_local_paths(dry_run_with_data):
    cwd, job_dir, ids = dry_run_with_data
    snap = job_dir / "azureml" / "snapshot"
    forbidden = [*ids.values(), str(cwd), str(Path.home()), "canary-vault"]
    for path, data in every_file(snap).items():  # the payload's pickle included, read as bytes
        for value in forbidden:
            assert value.encode() not in data, (path, value)
    job = payload.read(snap / payload.PAYLOAD_FILE)
    assert job.config.hydra.launcher == {} and job.config.hydra.overrides.hydra == []
    assert job.config.dataset.data_dir == "${{inputs.dataset_data_dir}}"  # the binding, not the local folder


def test_the_readable_config_shows_what_the_nodes_run(dry_run_with_data):
    _, job_dir, _ = dry_run_with_data
    readable = yaml.safe_load((job_dir / "azureml" / "snapshot" / "nlpwf_job.yaml").read_text())
    assert readable["dataset"]["data_dir"] == "${{inputs.dataset_data_dir}}"
    assert readable["checkpoint_dir"] == "${{outputs.checkpoints}}" and readable["training"]["resume"] == "auto"


def test_the_job_carries_the_secrets_names_only(dry_run_with_data):
    _, job_dir, _ = dry_run_with_data
    env = yaml.safe_load((job_dir / "azureml" / "job.yaml").read_text())["environment_variables"]
    assert env[secrets.KEY_VAULT_ENV] == "https://canary-vault.vault.azure.net"
    assert env[secrets.SECRETS_ENV] == "HF_TOKEN=hf-token" and "HF_TOKEN" not in env


@pytest.mark.parametrize("vault, named, message", [
    (None, {"HF_TOKEN": "hf-token"}, "hydra.launcher.key_vault=None is not a vault URL"),
    ("https://v.vault.azure.net", {"HF_TOKEN": "bad name!"}, "hydra.launcher.secrets.HF_TOKEN=bad name!"),
])
def test_secrets_need_a_vault_and_plain_names(vault, named, message):
    with pytest.raises(UserError, match=None) as e:
        secrets.job_environment(vault, named)
    assert message in str(e.value)


class KeyVault(RecordingTransport):
    """Key Vault's REST API as the Secrets client library sees it: a challenge (401) without a
    token, then each secret's value."""

    def __init__(self, values: dict):
        super().__init__()
        self.values = values

    def send(self, request, **kwargs):
        self.requests.append(request)
        if "Authorization" not in request.headers:
            r = self.response(request, 401, {"error": {"code": "Unauthorized"}})
            r.headers["WWW-Authenticate"] = ('Bearer authorization="https://login.microsoftonline.com/tenant", '
                                             'resource="https://vault.azure.net"')
            return r
        name = request.url.split("?")[0].rstrip("/").split("/secrets/", 1)[1].split("/")[0]
        if name not in self.values:
            return self.response(request, 404, {"error": {"code": "SecretNotFound", "message": name}})
        return self.response(request, 200, {"value": self.values[name],
                                            "id": f"https://v.vault.azure.net/secrets/{name}/1", "attributes": {}})


class Identity:
    """The job's identity, as azure-identity would give it on a node (a managed identity's token)."""

    def get_token(self, *scopes, **kwargs):
        assert scopes == ("https://vault.azure.net/.default",), scopes
        return AccessToken("identity-token", 4102444800)


def test_the_nodes_fetch_the_named_secrets_from_the_key_vault():
    env = secrets.job_environment("https://v.vault.azure.net", {"HF_TOKEN": "hf-token", "DB_PASSWORD": "db"})
    transport = KeyVault({"hf-token": CANARY, "db": "s3cret"})

    set_here = secrets.load_into_environ(env, credential=Identity(), transport=transport)

    assert set_here == ["HF_TOKEN", "DB_PASSWORD"]
    assert env["HF_TOKEN"] == CANARY and env["DB_PASSWORD"] == "s3cret"
    fetched = {r.url.split("?")[0].rstrip("/") for r in transport.requests if "Authorization" in r.headers}
    assert fetched == {"https://v.vault.azure.net/secrets/hf-token", "https://v.vault.azure.net/secrets/db"}
    assert all(r.headers["Authorization"] == "Bearer identity-token" for r in transport.requests if "Authorization" in r.headers)


def test_a_job_without_secrets_asks_no_vault():
    assert secrets.load_into_environ({"OMP_NUM_THREADS": "8"}) == []
    assert json.dumps(secrets.job_environment(None, {})) == "{}"
