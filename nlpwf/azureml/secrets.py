"""Secrets and Azure ML jobs: kept out of what is sent, fetched by the job itself.

Whatever goes into a job's environment variables, command or code snapshot is stored with the
job and shown to anyone who can read the workspace. So an environment variable whose name or
value looks like a credential (HF_TOKEN, *_KEY, *_SECRET, *_PASSWORD, *_TOKEN, a connection
string, hf_..., AKIA..., a JWT, ...) is refused before anything is written or sent.

The supported way, as Azure ML's documentation describes it ("Use authentication credential
secrets in Azure Machine Learning jobs"): the secret lives in an Azure Key Vault (the
workspace's own, or any other), and the job reads it at run time with its own identity (the
compute cluster's managed identity, granted *Key Vault Secrets User* on the vault), through the
Key Vault Secrets client library. nlpwf does that for the user:

    hydra.launcher.key_vault=https://MYVAULT.vault.azure.net
    +hydra.launcher.secrets.HF_TOKEN=hf-token     # environment variable = Key Vault secret NAME

The job then carries only names (NLPWF_KEY_VAULT, NLPWF_KEY_VAULT_SECRETS=HF_TOKEN=hf-token),
and every process on the nodes sets HF_TOKEN from the vault before the task starts
(load_into_environ, called by payload.restore). The value never leaves Azure.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Mapping

from nlpwf.errors import UserError

log = logging.getLogger(__name__)

KEY_VAULT_ENV = "NLPWF_KEY_VAULT"          # the vault's URL, in the job's environment
SECRETS_ENV = "NLPWF_KEY_VAULT_SECRETS"    # ENV=secret-name[,ENV=secret-name...]: names only
SAFE_WAY = ("keep it in an Azure Key Vault and let the job fetch it: hydra.launcher.key_vault=https://VAULT.vault.azure.net "
            "+hydra.launcher.secrets.{name}=SECRET_NAME (docs/azureml.md#secrets)")

# Names of credentials: HF_TOKEN, GITHUB_TOKEN, *_KEY, *_SECRET, *_PASSWORD, connection strings, ...
_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|KEY|APIKEY|CREDENTIALS?|SAS|CONNECTION_?STRING|CONN_?STR|"
                   r"PRIVATE_KEY|ACCESS_KEY|AUTH)($|_)", re.I)
# Values that are credentials whatever their name.
_VALUE = re.compile("|".join([
    r"\bhf_[A-Za-z0-9]{30,}\b",                                # Hugging Face tokens (hf_ and 34 letters; not a path like hf_datasets)
    r"\b(AKIA|ASIA)[A-Z0-9]{16}\b",                            # AWS access keys
    r"\beyJ[\w-]{5,}\.[\w-]{5,}\.[\w-]*",                      # JWTs (Azure AD tokens, ...)
    r"(AccountKey|SharedAccessKey|SharedAccessSignature|Password|Pwd)\s*=",  # connection strings
    r"[?&]sig=[\w%+/=-]{10,}",                                 # SAS URLs
    r"\b(ghp|gho|ghs|github_pat|glpat|xox[abp]|sk)[-_][A-Za-z0-9_-]{10,}",  # GitHub, GitLab, Slack, API keys
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
]))


def credential_like(name: str, value: str) -> str | None:
    """Why an environment variable looks like a credential ("name" / "value"), or None."""
    if _NAME.search(name):
        return "name"
    if _VALUE.search(str(value)):
        return "value"
    return None


def refuse_credentials(env: Mapping[str, object], where: str = "hydra.launcher.environment_variables") -> None:
    """UserError (one line, naming the safe way) for the first variable that looks like a credential.
    The value is never repeated."""
    for name, value in env.items():
        why = credential_like(str(name), str(value))
        if why:
            raise UserError(f"{where}.{name}: its {why} looks like a credential, and a job's environment is stored "
                            f"with the job and shown in Studio: remove it, and {SAFE_WAY.format(name=name)}")


def job_environment(key_vault: str | None, secrets: Mapping[str, str] | None) -> dict[str, str]:
    """The variables that tell the nodes which secrets to fetch (names only), or {}."""
    secrets = dict(secrets or {})
    if not secrets:
        return {}
    if not key_vault or not re.match(r"^https://[\w.-]+/?$", str(key_vault)):
        raise UserError(f"hydra.launcher.secrets names {', '.join(secrets)} but hydra.launcher.key_vault={key_vault} is not "
                        "a vault URL: set hydra.launcher.key_vault=https://VAULT.vault.azure.net")
    for env, name in secrets.items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", str(env)) or not re.match(r"^[A-Za-z0-9-]{1,127}$", str(name)):
            raise UserError(f"hydra.launcher.secrets.{env}={name}: use an environment variable name and a Key Vault "
                            "secret name (letters, digits and dashes)")
    return {KEY_VAULT_ENV: str(key_vault).rstrip("/"), SECRETS_ENV: ",".join(f"{e}={n}" for e, n in secrets.items())}


def load_into_environ(environ: dict | None = None, credential=None, **client_kwargs) -> list[str]:
    """On the nodes: each secret the job names, from its Key Vault into the environment, with the
    job's own identity (the cluster's managed identity; DEFAULT_IDENTITY_CLIENT_ID names a
    user-assigned one). The names of the variables set; nothing when the job names no secret."""
    environ = os.environ if environ is None else environ
    wanted = [item.split("=", 1) for item in environ.get(SECRETS_ENV, "").split(",") if "=" in item]
    if not wanted:
        return []
    from azure.keyvault.secrets import SecretClient

    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential(managed_identity_client_id=environ.get("DEFAULT_IDENTITY_CLIENT_ID"))
    with SecretClient(environ[KEY_VAULT_ENV], credential, **client_kwargs) as client:
        for env, name in wanted:
            environ[env] = client.get_secret(name).value
    log.info("set %s from Key Vault %s", ", ".join(env for env, _ in wanted), environ[KEY_VAULT_ENV])
    return [env for env, _ in wanted]
