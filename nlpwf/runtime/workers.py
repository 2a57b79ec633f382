"""Starting a job's ranks as processes on this machine, and reading how they ended.

nlpwf's local runs and the Azure ML emulator both start nodes x processes_per_node copies of
a command here, each with the env contract of its rank (runtime.contract), stop them all when
one fails, and turn the first failing exit code into one of nlpwf's errors.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from nlpwf.errors import Interrupted, JobFailed, PeerLost, UserError
from nlpwf.runtime.contract import contract_env
from nlpwf.runtime.network import free_port, host_address, reserved_port  # noqa: F401 - free_port: tests and benchmarks take it from here
from nlpwf.runtime.threads import threads_per_process

log = logging.getLogger(__name__)


def _pump(stream, prefix: str, sink) -> None:
    for line in iter(stream.readline, ""):
        sink.write(f"{prefix}{line}")
        sink.flush()
    stream.close()


def run_workers(
    command: list[str], nodes: int, processes_per_node: int, *, cwd: Path | None = None,
    extra_env: dict[str, str] | None = None, threads: int | None = None, grace_s: float = 10.0,
    azureml: bool = False,
) -> int:
    """Start nodes × processes_per_node copies of `command` on this machine, each with the env
    contract of its rank, and wait. If one fails the others are stopped (a DDP peer waiting on
    a dead rank would otherwise hang until the collective timeout). Returns the first failing
    exit code, or 0. MASTER_PORT is held for the job from before the first rank starts until
    the last one ends (network.reserved_port): rank 0's store binds it, nobody else can.

    `azureml`: the processes see what Azure ML's nodes see, no more: `extra_env` (the job's
    own variables and what the platform sets, as the emulator passes them) and the documented
    contract (no LOCAL_WORLD_SIZE, no OMP_NUM_THREADS but what `extra_env` sets), nothing
    inherited from this process: an allow-list. MASTER_ADDR is this machine's network address
    rather than loopback (the interface GLOO_SOCKET_IFNAME names, when it has one), so no
    process can tell that every rank runs on one machine."""
    world = nodes * processes_per_node
    threads = threads or threads_per_process(None, world)
    extra_env = dict(extra_env or {})
    base = extra_env if azureml else {**os.environ, **extra_env}
    master = host_address(extra_env.get("GLOO_SOCKET_IFNAME")) if azureml else "127.0.0.1"
    with reserved_port(master) as port:
        procs, pumps = [], []
        for node in range(nodes):
            for local in range(processes_per_node):
                rank = node * processes_per_node + local
                contract = contract_env(rank, local, node, world, processes_per_node, port, threads,
                                        master_addr=master, azureml=azureml)
                proc, pump = _start(command, rank, cwd, {**base, **contract})
                procs.append(proc)
                pumps.append(pump)
        if azureml:
            log.info("started %d processes (%d node(s) x %d) with Azure ML's contract, master %s", world, nodes,
                     processes_per_node, master)
        else:
            log.info("started %d worker processes (%d node(s) x %d), %d thread(s) each", world, nodes, processes_per_node,
                     threads)
        return _wait(procs, pumps, grace_s)


def _start(command: list[str], rank: int, cwd: Path | None, env: dict[str, str]) -> tuple[subprocess.Popen, threading.Thread]:
    """One rank's process, its output prefixed with `[rank N]` on this process's stdout."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    pump = threading.Thread(target=_pump, args=(proc.stdout, f"[rank {rank}] ", sys.stdout), daemon=True)
    pump.start()
    return proc, pump


def _wait(procs: list[subprocess.Popen], pumps: list[threading.Thread], grace_s: float) -> int:
    """Wait for every rank; stop them all when one fails. The first failing exit code, or 0."""
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


def raise_for_exit(code: int, who: str, hint: str) -> None:
    """The one reading of a job's exit code, for local workers and emulated Azure ML jobs alike."""
    if code == 0:
        return
    if code == UserError.exit_code:
        raise UserError(f"{who} rejected the job's input (its message is above): fix it and run again")
    if code == Interrupted.exit_code:
        raise Interrupted(f"training stopped by SIGTERM; {hint}")
    raise JobFailed(f"{who} {describe_exit(code)} (the 'rank N' lines above say which and why); {hint}")


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
