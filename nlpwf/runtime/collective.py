"""The process group and the few collectives nlpwf itself issues (outside DDP's own)."""
from __future__ import annotations

import hashlib
import importlib
from datetime import timedelta

import torch
import torch.distributed as dist

from nlpwf.runtime.contract import Rank


def backend() -> str:
    """oneCCL when its PyTorch bindings are installed (they register `ccl` on import), else gloo."""
    for module in ("oneccl_bindings_for_pytorch", "torch_ccl"):
        try:
            importlib.import_module(module)
            return "ccl"
        except ImportError:
            continue
    return "gloo"


def init_process_group(rank: Rank, timeout_s: float) -> str:
    """Join the group before transformers does, so nlpwf picks the backend and the timeout
    (accelerate reuses an initialised group; left alone it would pick gloo and 30 minutes)."""
    name = backend()
    if not dist.is_initialized():
        dist.init_process_group(name, rank=rank.rank, world_size=rank.world_size, timeout=timedelta(seconds=timeout_s))
    return name


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized()


def gather(item) -> list:
    """`item` from every rank, in rank order ([item] outside a group)."""
    if not _grouped():
        return [item]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, item)
    return everyone


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one."""
    if not _grouped() or dist.get_world_size() < 2:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if _grouped():
        dist.barrier()


def parameter_digests(model) -> list[str]:
    """A hash of this rank's parameters, gathered from every rank: DDP replicas must agree."""
    h = hashlib.sha256()
    with torch.no_grad():
        for p in model.parameters():
            h.update(p.detach().float().contiguous().cpu().numpy().tobytes())
    return gather(h.hexdigest()[:16])
