"""Azurite, the Azure Storage emulator (npm package `azurite`), as a real blob server for the
tests that upload a job's inputs and download its results.

It lives in tests/.azurite (`npm install --prefix tests/.azurite azurite@VERSION`): `.ci/run`
installs it (`python tests/azurite.py`), and the fixture does when it is missing (Node.js and
npm are on every machine here), so a fresh `python -m pytest` runs these tests rather than
skipping them. The fixture starts its blob service on a free localhost port (port 0: Azurite
says which it took), in memory, waits until it answers, and kills it afterwards.

How the Azure ML side reaches it: the tests' ARM transport answers the datastore as an Azure
Blob datastore of Azurite's well-known development account, over http. nlpwf builds its blob
client from those details (https://ACCOUNT.blob.ENDPOINT on Azure; here
http://devstoreaccount1.blob.core.windows.net), and HTTP_PROXY, set for the test, sends that
plain-http traffic to Azurite, which takes the account from the Host header (its
"production-style" URLs). Nothing of nlpwf or azure-storage-blob is patched.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass

import pytest

from nlpwf import PROJECT_ROOT

VERSION = "3.37.0"
PREFIX = PROJECT_ROOT / "tests" / ".azurite"
AZURITE_BLOB = PREFIX / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
# Azurite's development account key: published in Azurite's documentation, valid nowhere else.
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
ENDPOINT = "core.windows.net"
_LISTENS = re.compile(r"Blob service successfully listens on (http://[\d.]+:\d+)")


@dataclass
class Azurite:
    url: str  # http://127.0.0.1:PORT

    def container(self, name: str):
        """A client of one of its containers, as a test sees the storage (created if missing)."""
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient(f"{self.url}/{ACCOUNT}", credential={"account_name": ACCOUNT, "account_key": KEY})
        client = service.get_container_client(name)
        if not client.exists():
            client.create_container()
        return client


def install() -> None:
    """npm install of the pinned Azurite into tests/.azurite, once (a lock serialises pytest's workers)."""
    import fcntl

    PREFIX.mkdir(parents=True, exist_ok=True)
    with open(PREFIX / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if AZURITE_BLOB.exists():
            return
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is missing: install Node.js 20 (Azurite, the storage emulator the tests use, is an npm package)")
        subprocess.run([npm, "install", "--prefix", str(PREFIX), "--no-audit", "--no-fund", "--silent",
                        f"azurite@{VERSION}"], check=True, timeout=900)


def start(timeout: float = 60) -> tuple[subprocess.Popen, str]:
    install()
    proc = subprocess.Popen([str(AZURITE_BLOB), "--blobHost", "127.0.0.1", "--blobPort", "0", "--inMemoryPersistence",
                             "--extentMemoryLimit", "512", "--skipApiVersionCheck", "--loose"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    for line in proc.stdout:  # Azurite says the port it took once it listens
        found = _LISTENS.search(line)
        if found:
            return proc, found.group(1)
        if time.monotonic() > deadline:
            break
    stop(proc)
    raise RuntimeError("Azurite did not start listening")


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)
    if proc.stdout:
        proc.stdout.close()


def ready(url: str, timeout: float = 30) -> None:
    """Wait until the blob service answers HTTP (any status: it is up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/{ACCOUNT}?comp=list", timeout=5)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="module")
def azurite():
    assert shutil.which("node"), "Node.js is needed for Azurite"
    proc, url = start()
    try:
        ready(url)
        yield Azurite(url)
    finally:
        stop(proc)


@pytest.fixture
def via_azurite(azurite, monkeypatch):
    """Plain-http blob traffic of this test goes to Azurite (see the module's docstring)."""
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", azurite.url)
    monkeypatch.setenv("http_proxy", azurite.url)
    return azurite


def datastore_body(name: str, container: str) -> dict:
    """ARM's answer for a blob datastore of Azurite's account (what the tests' transports send)."""
    return {"name": name, "type": "Microsoft.MachineLearningServices/workspaces/datastores", "properties": {
        "datastoreType": "AzureBlob", "accountName": ACCOUNT, "containerName": container, "endpoint": ENDPOINT,
        "protocol": "http", "isDefault": name == "workspaceblobstore", "credentials": {"credentialsType": "AccountKey"}}}


SECRETS = {"secretsType": "AccountKey", "key": KEY}
# The workspace's datastores in these tests: name -> Azurite container
CONTAINERS = {"workspaceblobstore": "azureml-blobstore-test", "workspaceartifactstore": "azureml-test"}


@pytest.fixture
def storage(via_azurite):
    """The datastores' containers in Azurite, emptied; `put(blobs, datastore)` fills one and
    `storage.blobs(datastore)` reads one back ({name: (bytes, etag)})."""
    containers = {name: via_azurite.container(c) for name, c in CONTAINERS.items()}
    for c in containers.values():
        for blob in list(c.list_blobs()):
            c.delete_blob(blob.name)

    def put(blobs: dict, datastore: str = "workspaceblobstore"):
        for name, data in blobs.items():
            containers[datastore].upload_blob(name, data, overwrite=True)

    def blobs(datastore: str = "workspaceblobstore") -> dict:
        c = containers[datastore]
        return {b.name: (c.download_blob(b.name).readall(), b.etag) for b in c.list_blobs()}

    put.blobs = blobs
    return put


if __name__ == "__main__":  # .ci/run: install it before the tests
    install()
    print(f"Azurite {VERSION} in {PREFIX}")
