"""Distributed set-up on CPU nodes.

One contract for every way a training process starts: torchrun, Azure ML's PyTorch
distribution and nlpwf's own local launcher all set MASTER_ADDR, MASTER_PORT, WORLD_SIZE,
RANK, LOCAL_RANK and NODE_RANK. A process that finds them joins the group; one that does
not is either a single-process run or the parent that starts the workers (`run_workers`).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import psutil

from nlpwf.errors import Interrupted, PeerLost

log = logging.getLogger(__name__)

CONTRACT = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Rank | None:
    """The process's place in the group, or None when not started as part of one."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return Rank(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ["WORLD_SIZE"]),
        node_rank=int(os.environ.get("NODE_RANK", 0)),
    )


def backend() -> str:
    """oneCCL when its PyTorch bindings are installed (they register `ccl` on import), else gloo."""
    for module in ("oneccl_bindings_for_pytorch", "torch_ccl"):
        try:
            importlib.import_module(module)
            return "ccl"
        except ImportError:
            continue
    return "gloo"


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def threads_per_process(configured: int | None, processes_on_node: int, cores: int | None = None) -> int:
    """OMP threads for each process: the node's cores shared out, never oversubscribed."""
    if configured:
        return int(configured)
    return max(1, (cores or physical_cores()) // max(1, processes_on_node))


def set_threads(n: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def init_process_group(rank: Rank, timeout_s: float) -> str:
    """Join the group before transformers does, so nlpwf picks the backend and the timeout
    (accelerate reuses an initialised group; left alone it would pick gloo and 30 minutes)."""
    import torch.distributed as dist

    name = backend()
    if not dist.is_initialized():
        dist.init_process_group(name, rank=rank.rank, world_size=rank.world_size, timeout=timedelta(seconds=timeout_s))
    return name


def parameter_digests(model) -> list[str]:
    """A hash of this rank's parameters, gathered from every rank: DDP replicas must agree."""
    import hashlib

    import torch
    import torch.distributed as dist

    h = hashlib.sha256()
    with torch.no_grad():
        for p in model.parameters():
            h.update(p.detach().float().contiguous().cpu().numpy().tobytes())
    mine = h.hexdigest()[:16]
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def contract_env(rank: int, local_rank: int, node_rank: int, world_size: int, local_world_size: int,
                 port: int, threads: int) -> dict[str, str]:
    return {
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
        "RANK": str(rank), "LOCAL_RANK": str(local_rank), "NODE_RANK": str(node_rank),
        "LOCAL_WORLD_SIZE": str(local_world_size), "OMP_NUM_THREADS": str(threads),
    }


def _pump(stream, prefix: str, sink) -> None:
    for line in iter(stream.readline, ""):
        sink.write(f"{prefix}{line}")
        sink.flush()
    stream.close()


def run_workers(
    command: list[str], nodes: int, processes_per_node: int, *, cwd: Path | None = None,
    extra_env: dict[str, str] | None = None, threads: int | None = None, grace_s: float = 10.0,
) -> int:
    """Start nodes × processes_per_node copies of `command` on this machine, each with the env
    contract of its rank, and wait. If one fails the others are stopped (a DDP peer waiting on
    a dead rank would otherwise hang until the collective timeout). Returns the first failing
    exit code, or 0."""
    world = nodes * processes_per_node
    threads = threads or threads_per_process(None, world)
    port = free_port()
    procs: list[subprocess.Popen] = []
    pumps = []
    for node in range(nodes):
        for local in range(processes_per_node):
            rank = node * processes_per_node + local
            contract = contract_env(rank, local, node, world, processes_per_node, port, threads)
            env = {**os.environ, **(extra_env or {}), **contract}
            p = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, bufsize=1, start_new_session=True)
            t = threading.Thread(target=_pump, args=(p.stdout, f"[rank {rank}] ", sys.stdout), daemon=True)
            t.start()
            procs.append(p)
            pumps.append(t)
    log.info("started %d worker processes (%d node(s) x %d), %d thread(s) each", world, nodes, processes_per_node, threads)
    failed: tuple[int, int] | None = None
    try:
        with _forwarding_sigterm(procs) as terminating:
            while any(p.poll() is None for p in procs):
                ended = [(rank, p.returncode) for rank, p in enumerate(procs) if p.poll() not in (None, 0)]
                # Ranks that stopped on SIGTERM are not failures: the others stop at the same step, let them finish.
                stopping = terminating.is_set() or all(c == Interrupted.exit_code for _, c in ended)
                if ended and failed is None and not stopping:
                    # Ranks that merely lost a peer (PeerLost) are a symptom: name the cause when it has ended too.
                    failed = next((e for e in ended if e[1] != PeerLost.exit_code), ended[0])
                    log.error("rank %d %s; stopping the other ranks", failed[0], describe_exit(failed[1]))
                    _stop(procs, grace_s)
                time.sleep(0.2)
    except KeyboardInterrupt:
        _stop(procs, grace_s)
        raise
    finally:
        for t in pumps:
            t.join(timeout=5)
    if failed is None:
        failed = next(((r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0), None)
    return 0 if failed is None else failed[1]


@contextlib.contextmanager
def _forwarding_sigterm(procs: list[subprocess.Popen]):
    """SIGTERM to this process goes on to every rank, which checkpoints and exits (train.py).
    The event it yields tells the wait loop that ranks now end on purpose."""
    asked = threading.Event()

    def forward(signum, frame):
        asked.set()
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward) if threading.current_thread() is threading.main_thread() else None
    try:
        yield asked
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    if code == Interrupted.exit_code:
        return f"exited with code {code} (it stopped on SIGTERM after a checkpoint)"
    if code == PeerLost.exit_code:
        return f"exited with code {code} (it lost contact with another rank)"
    return f"exited with code {code}"


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
