"""A lost peer of a distributed job as one line that says which rank and what to do next.

When a rank dies, its peers' next collective fails: at once if the dead process's sockets were
closed (gloo: "Connection reset/closed by peer"), or after `training.ddp_timeout` seconds if the
peer stalled or its machine vanished ("Timed out"). Either way the survivors raise PeerLost
instead of a C++ stack, and exit with PeerLost's code.
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable

from nlpwf.errors import PeerLost
from nlpwf.runtime.contract import Rank

# What gloo and torch.distributed say when a peer is gone or silent.
_PEER_GONE = re.compile(r"gloo|Connection (reset|closed) by peer|Timed out waiting|ProcessGroup|\b(NCCL|ccl|oneCCL)\b", re.I)


def _others(rank: Rank) -> str:
    others = [r for r in range(rank.world_size) if r != rank.rank]
    return f"rank {others[0]}" if len(others) == 1 else f"one of ranks {', '.join(map(str, others))}"


@contextlib.contextmanager
def peer_loss(rank: Rank, next_step: Callable[[], str]):
    """Around the collective-heavy part of a distributed run. `next_step` says what to do
    (e.g. where to resume), asked only when a peer is lost."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if rank.world_size < 2 or not _PEER_GONE.search(text):
            raise
        cause = "timed out waiting for" if "Timed out" in text else "lost its connection to"
        first = re.split(r"(?<=\.)\s", re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0]))[0][:160]
        raise PeerLost(
            f"rank {rank.rank} {cause} {_others(rank)} (it died or stalled; its log says why) "
            f"[{first}]; {next_step()}"
        ) from e
