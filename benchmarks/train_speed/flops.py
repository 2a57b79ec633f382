"""Section 1, the matmul peak of this machine (sampled between turns), and the FLOP count of a
training step that MFU and HFU divide by it."""
from __future__ import annotations

import math
import time

from .variants import ARCH


def train_flops(model: str, batches: list) -> tuple[float, float, float]:
    """(model FLOPs on the real tokens, FLOPs computed on padded tokens, FLOPs computed unpadded
    with the last layer for the pooled token only) for training steps: 3x the forward's matmuls
    (QKV, output, FFN: 2*(4H^2 + 2HI) per token per layer) plus attention (4*L^2*H per sequence per
    layer). In that last layer only keys and values (2*2H^2) are computed for every token, the
    rest for each sequence's first, whose attention is one row (4*L*H). Embedding lookups and the
    head are negligible."""
    layers, h, i = ARCH[model]
    per_token, per_sq = 2 * (4 * h * h + 2 * h * i), 4 * h
    useful = sum(per_token * s + per_sq * s2 for _, _, _, _, s, s2 in batches)
    padded = sum(n * (per_token * p + per_sq * p * p) for n, p, *_ in batches)
    left_out = sum((per_token - 2 * 2 * h * h) * (s - n) + per_sq * (s2 - s) for n, _, _, _, s, s2 in batches)
    return 3 * layers * useful, 3 * layers * padded, 3 * (layers * useful - left_out)


def peak_gemm(dtype_name: str, n: int, reps: int) -> float:
    """Best FLOP/s of an n x n matmul: this machine's practical matmul peak for the dtype."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def sample_peaks(peaks: dict, args) -> None:
    """Raise `peaks` (per dtype) to this sample's peak if higher: the best seen in the run."""
    for dtype in ("fp32", "bf16"):
        peaks[dtype] = max(peaks.get(dtype, 0.0), peak_gemm(dtype, args.gemm_n, args.gemm_reps))
