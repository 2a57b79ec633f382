"""Would compiling parts of an encoder layer pay? torch.compile of each region of the unpadded
BERT layer against eager, forward and backward, on MiniLM-L6's sizes and MRPC-like token counts.

    python benchmarks/compile_regions.py             # bf16 and fp32, about 2 minutes on 2 cores
    python benchmarks/compile_regions.py --dtypes bf16 --reps 60

Compiling the whole model trained slower than eager here (compile_speed.py). What is left of a
bf16 unpadded step besides matmuls is elementwise work around them: the residual add and layer
norm, the bias and GELU, autocast's casts, the softmax. Inductor fuses such chains into one
pass each, forward and backward, so a region compiled on its own might pay where the whole model
did not. Each region is the computation unpad.py runs, written as a function of tensors (the
weights are arguments, so one compiled graph serves every layer), compiled with dynamic shapes
(the packed token count changes every batch):

- attention output: layer_norm(dense(attention) + residual), hidden to hidden;
- intermediate: gelu(dense(hidden)), hidden to 4 x hidden;
- feed-forward: the intermediate, then layer_norm(dense(.) + hidden): BertLayer after attention;
- attention core: softmax(scores + mask) @ V for a group of 4 sequences, all heads.

Eager and compiled run alternately on the same inputs (same token counts, in turn) and each
reports the median time of a forward and backward; "warm-up" is the compiled region's first
calls (compiling), from an empty inductor cache. Writes results/compile_regions.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, INTERMEDIATE, HEADS = 384, 1536, 12  # MiniLM-L6
TOKENS = [848, 864, 880, 912, 1104, 1120, 960, 768]  # packed tokens of MRPC batches of 16, rounded to 16
WIDTHS = [48, 64, 80, 96, 112]  # a group's padded length (bf16 rounds it to 16)


def regions():
    """name -> (function, inputs(tokens, dtype) -> tuple of tensors)."""
    import torch
    import torch.nn.functional as F

    def param(*shape):
        return torch.nn.Parameter(torch.randn(*shape) * 0.02)

    w_ao, b_ao, w_in, b_in, w_out, b_out = param(HIDDEN, HIDDEN), param(HIDDEN), param(INTERMEDIATE, HIDDEN), \
        param(INTERMEDIATE), param(HIDDEN, INTERMEDIATE), param(HIDDEN)
    ln_w, ln_b = torch.nn.Parameter(torch.ones(HIDDEN)), torch.nn.Parameter(torch.zeros(HIDDEN))

    def residual(x, res, w, b):
        return F.layer_norm(F.linear(x, w, b) + res, (HIDDEN,), ln_w, ln_b, 1e-12)

    def intermediate(h):
        return F.gelu(F.linear(h, w_in, b_in))

    def feed_forward(h):
        return residual(intermediate(h), h, w_out, b_out)

    def attention(q, k, v, mask):
        scores = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=(HIDDEN // HEADS) ** -0.5)
        return torch.bmm(torch.softmax(scores, dim=-1).to(v.dtype), v)

    def tokens(n, dtype):  # (attention output in the matmuls' dtype, fp32 residual stream)
        return (torch.randn(n, HIDDEN, dtype=dtype, requires_grad=True), torch.randn(n, HIDDEN, requires_grad=True))

    def heads(n, dtype):
        width = WIDTHS[n % len(WIDTHS)]
        q, k, v = (torch.randn(4 * HEADS, width, HIDDEN // HEADS, dtype=dtype, requires_grad=True) for _ in range(3))
        mask = torch.zeros(4 * HEADS, 1, width, dtype=dtype)
        mask[:, :, width - 7:] = torch.finfo(dtype).min
        return q, k, v, mask

    return {"attention output": (lambda a, h: residual(a, h, w_ao, b_ao), tokens),
            "intermediate": (lambda a, h: intermediate(h), tokens),
            "feed-forward": (lambda a, h: feed_forward(h), tokens),
            "attention core": (attention, heads)}


def step(fn, inputs, bf16: bool) -> float:
    """Seconds for one forward and backward of `fn(*inputs)` (autocast for bf16, as training runs it)."""
    import torch

    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = fn(*inputs)
    out.backward(torch.ones_like(out))
    return time.perf_counter() - t


def measure(name: str, fn, make, dtype: str, reps: int) -> dict:
    import torch

    bf16 = dtype == "bf16"
    compiled = torch.compile(fn, dynamic=True)
    inputs = {n: make(n, torch.bfloat16 if bf16 else torch.float32) for n in TOKENS}
    warm = sum(step(compiled, inputs[n], bf16) for n in TOKENS[:3])  # compiles, then checks the shapes stay dynamic
    for n in TOKENS:  # eager's own first calls (oneDNN picks its kernels)
        step(fn, inputs[n], bf16)
    eager, comp = [], []
    for i in range(reps):
        n = TOKENS[i % len(TOKENS)]
        eager.append(step(fn, inputs[n], bf16))
        comp.append(step(compiled, inputs[n], bf16))
    e, c = statistics.median(eager), statistics.median(comp)
    print(f"{dtype} {name}: eager {e * 1e3:.2f} ms, compiled {c * 1e3:.2f} ms ({e / c:.2f}x), warm-up {warm:.1f} s", flush=True)
    return {"region": name, "dtype": dtype, "eager_ms": e * 1e3, "compiled_ms": c * 1e3, "speedup": e / c, "warmup_s": warm}


def render(res: dict) -> str:
    lines = [f"# Regions of the encoder layer compiled, {res['date']}", "",
             f"Machine: {res['isa']}, {res['threads']} threads, torch {res['torch']}. Load average before/after: "
             f"{res['load_before']} / {res['load_after']}. Command: `{res['command']}`.", "",
             "Forward and backward of each region (benchmarks/compile_regions.py says what each is), median over "
             "the token counts in turn; eager and compiled alternate. Speedup: eager time / compiled time.", "",
             "| dtype | region | eager ms | compiled ms | speedup | compile warm-up s |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['dtype']} | {r['region']} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | {r['speedup']:.2f}x | "
              f"{r['warmup_s']:.1f} |" for r in res["rows"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--threads", type=int, default=None, help="default: the physical cores")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    # an empty inductor cache, so that the warm-up is what a first job pays
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="nlpwf-inductor-")
    import torch

    from nlpwf.runtime import isa, threads

    torch.set_num_threads(args.threads or threads.physical_cores())
    load = lambda: " ".join(f"{x:.1f}" for x in os.getloadavg())  # noqa: E731
    res = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "isa": isa.detect().summary(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "load_before": load(),
           "command": "python benchmarks/compile_regions.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    res["rows"] = [measure(name, fn, make, dtype, args.reps)
                   for dtype in args.dtypes.split(",") for name, (fn, make) in regions().items()]
    res["load_after"] = load()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_regions.json").write_text(json.dumps(res, indent=1))
    (args.out / "compile_regions.md").write_text(render(res))
    print(render(res))


if __name__ == "__main__":
    main()
