"""The turn scheduler: one process per variant, started together, then given the CPU in turns,
round-robin, so that a burst of load from other users of the machine lands on every variant
alike. worker.py is the other side of each pipe."""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

from .worker import worker


def start_workers(specs: dict[str, dict], tmp: Path) -> dict:
    """Start one process per variant; fast variants get the fast allocator preloaded when
    installed (LD_PRELOAD must be set before a process starts)."""
    from nlpwf.runtime import allocator

    ctx = mp.get_context("spawn")
    workers = {}
    for name, spec in specs.items():
        parent, child = ctx.Pipe()
        env = {"OMP_NUM_THREADS": str(spec["threads"])}
        if spec.get("preload"):
            env.update(allocator.preload_env())
        saved = {k: os.environ.get(k) for k in (*env, "LD_PRELOAD")}
        os.environ.update(env)
        try:
            p = ctx.Process(target=worker, args=(child, spec["overrides"], str(tmp / name), spec["turn_s"], spec["budget_s"],
                                                 spec.get("target"), spec.get("stop_at_target", False), spec.get("count_setup", False),
                                                 spec.get("plain")),
                            daemon=True)
            p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        workers[name] = (parent, p)
    for name, (conn, _) in workers.items():
        msg = conn.recv()
        if msg[0] != "ready":
            raise RuntimeError(f"worker {name} failed to start:\n{msg[1]}")
    return workers


def take_turns(workers: dict, between=None) -> dict:
    """Round-robin turns until every worker is done; `between()` runs after each round. Every
    other round goes in reverse order, so that no variant always follows the same one (a turn
    starts with caches the previous variant left)."""
    results, active, rounds = {}, list(workers), 0
    while active:
        rounds += 1
        for name in (list(active) if rounds % 2 else active[::-1]):
            conn, proc = workers[name]
            conn.send("go")
            msg = conn.recv()
            if msg[0] == "done":
                results[name] = msg[1]
                active.remove(name)
                proc.join(timeout=60)
            elif msg[0] == "error":
                raise RuntimeError(f"worker {name} failed:\n{msg[1]}")
            print(f"  {name}: {'done' if msg[0] == 'done' else 'turn'}", flush=True)
        if between and active:
            between()
    return results
