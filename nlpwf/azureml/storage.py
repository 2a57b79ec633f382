"""The workspace's blob storage, read and written through azure-storage-blob's public API.

nlpwf builds these clients itself instead of going through the SDK's artifact helpers, which
are private (`_upload_and_generate_remote_uri`, `get_datastore_info`) and build their blob
client from the cloud's metadata alone (always https://ACCOUNT.blob.core.windows.net, without
the MLClient's retry settings). Here the client comes from the datastore's public details
(`ml_client.datastores.get(name, include_secrets=True)`: account, container, protocol,
endpoint, key or SAS token; an identity-based datastore gets the workspace's credential) and
carries the launcher's retry settings (`hydra.launcher.retry_*`), so an upload or a download
is retried like every other request.

- upload: a local folder or file goes to `LocalUpload/<content hash>/<name>` of a datastore,
  as the SDK itself uploads a job's local input, once per content: a marker blob written
  after the last file says that the copy is whole, and a later upload of the same content
  (another sweep point, another run) finds it and sends nothing.
- fetch: the blobs under a datastore path are streamed to disk one chunk at a time (a few MB
  in memory, never a whole blob).
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

CHUNK = 4 * 1024 * 1024
UPLOAD_DIR = "LocalUpload"
UPLOADED_MARKER = ".nlpwf_uploaded"  # beside the upload: LocalUpload/<hash>/.nlpwf_uploaded, written last
# azureml://[subscriptions/S/resourcegroups/R/workspaces/W/]datastores/D/paths/P
_URI = re.compile(r"^azureml://(?:subscriptions/[^/]+/resourcegroups/[^/]+/workspaces/[^/]+/)?datastores/([^/]+)/paths/(.*)$",
                  re.I)


def split_uri(uri: str) -> tuple[str, str]:
    """(datastore, path prefix without surrounding slashes) of a datastore URI."""
    match = _URI.match(uri)
    if not match:
        raise ValueError(f"{uri} is not an azureml://datastores/NAME/paths/PATH URI")
    return match.group(1), match.group(2).strip("/")


def datastore_uri(datastore: str, path: str) -> str:
    return f"azureml://datastores/{datastore}/paths/{path}"


def container(ws, datastore: str):
    """azure-storage-blob's ContainerClient for a blob datastore of the workspace (see the module's docstring)."""
    from azure.ai.ml.entities import AzureBlobDatastore
    from azure.storage.blob import ContainerClient

    store = ws.ml_client.datastores.get(datastore, include_secrets=True)
    if not isinstance(store, AzureBlobDatastore):
        raise RuntimeError(f"datastore {datastore} is not an Azure Blob container: name a blob datastore "
                           "(hydra.launcher.datastore)")
    url = f"{store.protocol or 'https'}://{store.account_name}.blob.{store.endpoint or 'core.windows.net'}"
    secrets = store.credentials
    key, sas = getattr(secrets, "account_key", None), getattr(secrets, "sas_token", None)
    credential = {"account_name": store.account_name, "account_key": key} if key else sas or ws.credential
    return ContainerClient(url, store.container_name, credential=credential, retry_policy=retry_policy(ws.retry),
                           max_single_get_size=CHUNK, max_chunk_get_size=CHUNK, max_single_put_size=CHUNK,
                           max_block_size=CHUNK)


def retry_policy(retry: dict):
    """azure-storage-blob's own retry policy (its default would be 3 tries from 15 s) from the
    launcher's azure-core settings: as many retries, starting at retry_backoff_factor s and growing
    by powers of 2 (storage's formula: initial + 2**n, with jitter; it has no maximum)."""
    from azure.storage.blob import ExponentialRetry

    return ExponentialRetry(retry_total=int(retry.get("retry_total", 3)),
                            initial_backoff=float(retry.get("retry_backoff_factor", 0.8)), increment_base=2,
                            random_jitter_range=1)


def local_files(local: Path) -> list[tuple[str, Path]]:
    """(name relative to the upload's root, path) of every file to upload, sorted."""
    if local.is_file():
        return [(local.name, local)]
    return sorted((str(p.relative_to(local)), p) for p in local.rglob("*") if p.is_file())


def content_hash(files: list[tuple[str, Path]]) -> str:
    """What the upload is named by: names and bytes of its files (the same data is stored once)."""
    digest = hashlib.sha256()
    for name, path in files:
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def upload(ws, local: Path, datastore: str = "workspaceblobstore") -> str:
    """Upload a local folder or file (unless that content is there already); its azureml:// URI."""
    local = Path(local).resolve()
    files = local_files(local)
    root = f"{UPLOAD_DIR}/{content_hash(files)}"
    target = f"{root}/{local.name}"
    with container(ws, datastore) as client:
        marker = client.get_blob_client(f"{root}/{UPLOADED_MARKER}")
        if marker.exists():
            log.info("%s is in datastore %s already (%s)", local, datastore, target)
        else:
            for name, path in files:
                with path.open("rb") as f:
                    client.upload_blob(target if local.is_file() else f"{target}/{name}", f, overwrite=True, max_concurrency=1)
            marker.upload_blob(f"{len(files)} file(s)\n".encode(), overwrite=True)
    return datastore_uri(datastore, target + ("" if local.is_file() else "/"))


def fetch(ws, uri: str, dest: Path, keep: Callable[[str], bool]) -> list[str]:
    """Stream the blobs under `uri` whose relative path `keep` accepts into `dest`, one chunk at
    a time. Their relative paths."""
    datastore, prefix = split_uri(uri)
    got = []
    with container(ws, datastore) as client:
        for blob in client.list_blobs(name_starts_with=f"{prefix}/" if prefix else None):
            relative = blob.name[len(prefix):].lstrip("/") if prefix else blob.name
            if not relative or relative.endswith("/") or ".." in relative.split("/") or not keep(relative):
                continue
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as f:
                client.download_blob(blob.name, max_concurrency=1).readinto(f)
            got.append(relative)
    return got
