"""This machine on the network: its addresses, ports held for a job, and whether the Hugging
Face Hub can be reached (so an offline run fails in seconds with advice instead of retrying
downloads for minutes)."""
from __future__ import annotations

import contextlib
import functools
import os
import socket
from typing import Iterator
from urllib.parse import urlparse

import psutil

_TRUE = {"1", "true", "yes", "on"}
_HELD: list[socket.socket] = []  # ports reserved for this process's lifetime (free_port)


def offline_by_env() -> bool:
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    if offline_by_env():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def interface_address(name: str) -> str | None:
    """The IPv4 address of network interface `name`, or None."""
    for address in psutil.net_if_addrs().get(name, []):
        if address.family == socket.AF_INET:
            return address.address
    return None


def host_address(interface: str | None = None) -> str:
    """A non-loopback address of this machine, as a master node's is on a cluster: the given
    interface's, else the one the default route uses; loopback only when there is none."""
    found = interface_address(interface) if interface else None
    if found:
        return found
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _bound(host: str) -> socket.socket:
    """A TCP socket bound to a port the kernel picks on `host`, not listening.

    With SO_REUSEADDR on it, the server a job starts later (torch's TCPStore in rank 0, an MLflow
    server: both set SO_REUSEADDR too) can still bind and listen on that port, while the kernel
    never hands it out to anyone else (an ephemeral port skips ports that a socket is bound to),
    and a plain bind of it fails. So the port stays the job's from now until the reservation ends,
    instead of being free for anyone between picking it and the server's bind."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    return s


@contextlib.contextmanager
def reserved_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port on `host` held for the job that runs inside the `with` (see _bound)."""
    s = _bound(host)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` held until this process exits, for a server that a process started later
    binds (see _bound): for a caller that cannot scope it with `reserved_port`."""
    s = _bound(host)
    _HELD.append(s)
    return s.getsockname()[1]
