"""Section 5, scaling: the gloo all-reduce time of each model's gradients, 2 processes on
loopback, and the analytic multi-node model of benchmarks/README.md built on it."""
from __future__ import annotations

import multiprocessing as mp
import statistics
import time

from .variants import ARCH

D32 = {"name": "Standard_D32_v5", "cores": 16, "network_gbps": 16.0, "latency_s": 50e-6}


def measure_allreduce(models: list[str], reps: int) -> dict:
    """Median all-reduce time of one model's gradients (fp32 and bf16-compressed), 2 gloo
    processes on loopback: the per-step communication floor of DDP on this machine."""
    from nlpwf.runtime import workers

    numels = {m: parameter_count(m) for m in models}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = workers.free_port()
    procs = [ctx.Process(target=allreduce_worker, args=(r, port, numels, reps, queue)) for r in range(2)]
    for p in procs:
        p.start()
    result = queue.get(timeout=1800)
    for p in procs:
        p.join(timeout=60)
    return {"parameters": numels, "seconds": result}


def allreduce_worker(rank: int, port: int, numels: dict, reps: int, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    result = {}
    for name, numel in numels.items():
        for dtype in (torch.float32, torch.bfloat16):
            t = torch.ones(numel, dtype=dtype)
            dist.all_reduce(t)
            times = []
            for _ in range(reps):
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(t)
                times.append(time.perf_counter() - start)
            result[f"{name}/{str(dtype).replace('torch.', '')}"] = statistics.median(times)
    if rank == 0:
        queue.put(result)
    dist.destroy_process_group()


def parameter_count(model: str) -> int:
    from transformers import BertConfig, BertForSequenceClassification

    layers, h, i = ARCH[model]
    config = BertConfig(hidden_size=h, num_hidden_layers=layers, intermediate_size=i, num_attention_heads=12, num_labels=2)
    return sum(p.numel() for p in BertForSequenceClassification(config).parameters())


def scaling_model(model: str, measured: dict, params: int, this_cores: int, batch: int = 32) -> list[dict]:
    """Step time on 1-8 D32 nodes, each node training `batch` pairs per micro-step (weak
    scaling). Compute: the fast-fp32 recipe's model FLOP/s per core measured here, times a
    D32's cores (its Ice Lake has no bf16 matmul units, so fp32 is the honest rate). Network:
    a ring all-reduce of the gradients once per optimizer step, 2(N-1)/N x bytes / bandwidth
    plus 2(N-1) hop latencies. Pessimistic: no overlap with the backward pass."""
    flops_per_sample = measured["model_flops_per_s"] / measured["samples_per_s"]
    node_flops = measured["model_flops_per_s"] / this_cores * D32["cores"]
    rows = []
    for nodes in (1, 2, 4, 8):
        for grads, nbytes in (("fp32", 4), ("bf16", 2)):
            for accum in (1, 4):
                compute = batch * accum * flops_per_sample / node_flops
                ring = 0.0 if nodes == 1 else (2 * (nodes - 1) / nodes * params * nbytes * 8 / (D32["network_gbps"] * 1e9)
                                               + 2 * (nodes - 1) * D32["latency_s"])
                step = compute + ring
                rows.append({"nodes": nodes, "grads": grads, "accum": accum, "compute_s": compute, "allreduce_s": ring,
                             "samples_per_s": nodes * batch * accum / step, "efficiency": compute / step})
    return rows
