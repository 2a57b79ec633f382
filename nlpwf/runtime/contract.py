"""The distributed env contract every training process reads.

torchrun, Azure ML's PyTorch distribution and nlpwf's own local workers all set MASTER_ADDR,
MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK and NODE_RANK. A process that finds them is one rank
of a job someone started; one that does not is a single-process run, or the parent that
starts the workers (runtime.workers).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

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


def contract_env(rank: int, local_rank: int, node_rank: int, world_size: int, local_world_size: int,
                 port: int, threads: int, master_addr: str = "127.0.0.1", azureml: bool = False) -> dict[str, str]:
    """The variables of one rank started on this machine. `azureml`: only what Azure ML's
    PyTorch distribution documents (CONTRACT), as its nodes see them."""
    env = {
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
        "RANK": str(rank), "LOCAL_RANK": str(local_rank), "NODE_RANK": str(node_rank),
    }
    if not azureml:
        env.update(LOCAL_WORLD_SIZE=str(local_world_size), OMP_NUM_THREADS=str(threads))
    return env
