"""Where a training step's time goes: MiniLM-L6 on MRPC, the padded model (transformers' own
forward, as the plain Trainer runs it) against nlpwf's unpadded one, by kind of work.

    python benchmarks/step_profile.py                   # fp32 and bf16, about 3-5 minutes on 2 cores
    python benchmarks/step_profile.py --dtypes fp32 --batches 8 --rounds 2

Both models start from the same weights and train on the same batches (MRPC train, batch 16, in
the Trainer's random order, dynamic padding), one optimizer step each in turn: autocast for bf16,
backward, gradient clipping at 1.0, fused AdamW, as Trainer does, in a process set up as a
training job's is: glibc keeps freed memory, and after the first round the heap goes onto huge
pages (perf.huge_pages). Wall time per batch is the best of `--rounds` rounds (the machine is
shared). Then one profiled round per model gives each kind of work's share of the step: the
matmuls (dense layers and attention), drawing the dropout masks (`bernoulli_`: torch's CPU
generator is one serial stream, so this runs on one core whatever the thread count, and both
models draw the same masks), the optimizer and clipping, and the rest.

The bound: if everything but the mask draws took time in proportion to the matmul FLOPs
computed (train_speed.py's count: the padded tokens, or the real ones with the last layer for
the pooled token only), the unpadded step would take R + (T - R) x computed/padded FLOPs, for a
padded step of T with R spent drawing masks. `measured / bound` says how much of what computing
less could give it gets.

The floor: the unpadded model then takes the same steps with every sequence cut to two tokens
(`floor_batches`), profiled the same way. Such a step keeps what a step costs whatever its batch
(the optimizer and clipping, autocast's weight casts, the embedding gradient's fill, the
weight-gradient matmuls, each op's own work), and its non-matmul time against the full step's
matmul time is the lowest non-matmul / matmul the full step can reach without cutting any of
that. Writes results/step_profile.md and results/step_profile.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import train_speed as ts  # benchmarks/ is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mrpc"
# Kinds of work, by the op that does it (the profiler's self time of each op).
KINDS = {"aten::mm": "matmuls", "aten::addmm": "matmuls", "aten::bmm": "matmuls", "aten::baddbmm": "matmuls",
         "aten::bernoulli_": "dropout masks", "aten::_fused_adamw_": "optimizer and clipping",
         "aten::linalg_vector_norm": "optimizer and clipping"}
ORDER = ["matmuls", "dropout masks", "optimizer and clipping", "other"]
TOP_OTHER = 8  # the report names this many of the ops inside "other"
FLOOR_TOKENS = 2  # the floor's batches: each sequence cut to its first token and one more, or to the first alone (floor_batches)


def training_batches(data: Path, n: int, batch: int = 16, seed: int = 42) -> tuple[list[dict], object]:
    """The first `n` training batches of `experiment=mrpc_minilm` on the MRPC folder `data`, and its config."""
    import torch
    from hydra import compose, initialize_config_dir
    from transformers import DataCollatorWithPadding

    from nlpwf import CONF_DIR, models
    from nlpwf.data.splits import load_splits
    from nlpwf.data.tokenize import tokenize

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=mrpc_minilm", f"dataset.data_dir={data}"])
    task, splits = load_splits(cfg.dataset)
    tokenizer = models.load_tokenizer(cfg.model)
    train = tokenize(splits, tokenizer, cfg.dataset.max_seq_length, False)["train"].with_format(
        columns=["input_ids", "token_type_ids", "attention_mask", "labels"])
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    collate = DataCollatorWithPadding(tokenizer)
    return [collate([train[i] for i in order[b * batch:(b + 1) * batch]]) for b in range(n)], (cfg, task)


def make_model(cfg, task, unpadded: bool):
    import torch
    from transformers import set_seed

    from nlpwf import models
    from nlpwf.training import unpad

    set_seed(42)
    model = models.load_model(cfg.model, **task.model_config()).train()
    if unpadded and unpad.apply(model) is not None:
        raise RuntimeError("the packaged MiniLM-L6 should train unpadded")
    return model, torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)


def train_step(model, optimizer, inputs: dict, bf16: bool) -> float:
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def shares(model, optimizer, batches: list, bf16: bool) -> tuple[dict, list]:
    """Seconds of each kind of work over one round of `batches` (profiler self time), and the
    ops inside "other", largest first: (op, seconds, calls)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for inputs in batches:
            train_step(model, optimizer, inputs, bf16)
    out, other = dict.fromkeys(ORDER, 0.0), []
    for event in prof.key_averages():
        kind = KINDS.get(event.key, "other")
        out[kind] += event.self_cpu_time_total / 1e6
        if kind == "other":
            other.append((event.key, event.self_cpu_time_total / 1e6, event.count))
    return out, sorted(other, key=lambda op: -op[1])[:TOP_OTHER]


def floor_batches(batches: list, tokens: int = FLOOR_TOKENS) -> list:
    """`batches` with every sequence cut to its first `tokens` tokens, every other one a token
    shorter (so that the unpadded forward packs them: a batch without padding runs the stock
    forward). The same parameters, gradients, optimizer state and ops as a full step, with next to
    no tokens: what the step costs whatever its batch."""
    out = []
    for b in batches:
        cut = {k: v[:, :tokens].clone() for k, v in b.items() if k != "labels"}
        cut["attention_mask"][1::2, -1] = 0
        out.append({**cut, "labels": b["labels"]})
    return out


def measure(dtype: str, batches: list, cfg, task, rounds: int, heap) -> dict:
    """`heap`: this process's runtime.hugepages.HeapPages, put on huge pages after the first round."""
    import torch

    from nlpwf.runtime import hugepages
    from nlpwf.training import recorder

    bf16 = dtype == "bf16"
    models = {"padded": make_model(cfg, task, False), "unpadded": make_model(cfg, task, True)}
    best = {name: [float("inf")] * len(batches) for name in models}
    losses = {name: [] for name in models}
    for r in range(rounds):
        if r == 1:  # the first round grew the heap: onto huge pages, as a job's first step does (perf.huge_pages)
            hugepages.back_heap(heap)
        for i, inputs in enumerate(batches):
            state = torch.get_rng_state()
            for name, (model, opt) in models.items():  # alternate, so load hits both alike
                torch.set_rng_state(state)  # the same dropout masks for both
                t = time.perf_counter()
                loss = train_step(model, opt, inputs, bf16)
                best[name][i] = min(best[name][i], time.perf_counter() - t)
                if r == 0:
                    losses[name].append(loss)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded_tokens = sum(b["attention_mask"].numel() for b in batches)
    res = {"real_tokens": real, "padded_tokens": padded_tokens, "steps": len(batches),
           "max_loss_diff": max(abs(a - b) for a, b in zip(losses["padded"], losses["unpadded"]))}
    for name, (model, opt) in models.items():
        profile_s, other = shares(model, opt, batches, bf16)
        res[name] = {"step_s": sum(best[name]) / len(batches), "profile_s": profile_s, "other_ops": other}
    # the floor: the unpadded step on batches of next to no tokens, timed as the full steps are after a
    # round that warms its shapes, then profiled
    model, opt = models["unpadded"]
    short = floor_batches(batches)
    floor_best = [float("inf")] * len(short)
    for r in range(rounds + 1):
        for i, inputs in enumerate(short):
            t = time.perf_counter()
            train_step(model, opt, inputs, bf16)
            if r:
                floor_best[i] = min(floor_best[i], time.perf_counter() - t)
    floor_s, floor_other = shares(model, opt, short, bf16)
    res["floor"] = {"tokens": FLOOR_TOKENS, "step_s": sum(floor_best) / len(short), "profile_s": floor_s,
                    "other_ops": floor_other}
    t_pad, t_unpad = res["padded"]["step_s"], res["unpadded"]["step_s"]
    prof = res["padded"]["profile_s"]
    masks = prof["dropout masks"] / sum(prof.values()) * t_pad  # the draws' share of the padded step, in wall time
    res["speedup"] = t_pad / t_unpad
    _, padded_flops, computed_flops = ts.train_flops("minilm_l6", [recorder.mask_shape(b["attention_mask"]) for b in batches])
    res["bound"] = t_pad / (masks + (t_pad - masks) * computed_flops / padded_flops)
    return res


def render(res: dict) -> str:
    lines = [f"# Where a training step's time goes, {res['date']}", "",
             f"Machine: {res['isa']}, {res['threads']} threads, torch {res['torch']}, allocator {res.get('allocator', '?')}, "
             f"heap: {res.get('huge_pages', '4 kB pages')}. "
             f"Load average before/after: "
             f"{res['load_before']} / {res['load_after']}. Command: `{res['command']}`.", "",
             f"MiniLM-L6 on MRPC train, batch 16, {res['runs'][next(iter(res['runs']))]['steps']} batches in the "
             "Trainer's random order, one optimizer step each (autocast, backward, clipping, fused AdamW); wall time the best "
             "of the rounds; shares from one profiled round (self time per op). The bound assumes both models' kernels "
             "equally fast: the padded model's attention is transformers' default (sdpa), which in bf16 on CPU trains "
             "slower than the unpadded model's, so bf16 can pass it.", "",
             "| dtype | model | s/step | matmuls | dropout masks | optimizer and clipping | other | speedup | bound | "
             "of bound | loss diff |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for dtype, r in res["runs"].items():
        for name in ("padded", "unpadded"):
            prof = r[name]["profile_s"]
            total = sum(prof.values())
            cells = " | ".join(f"{prof[k] / total:.0%}" for k in ORDER)
            extra = (f"{r['speedup']:.2f}x | {r['bound']:.2f}x | {r['speedup'] / r['bound']:.0%} | {r['max_loss_diff']:.1e}"
                     if name == "unpadded" else "- | - | - | -")
            lines.append(f"| {dtype} | {name} | {r[name]['step_s']:.3f} | {cells} | {extra} |")
        lines.append("")
        lines.append(f"{dtype}: {r['real_tokens']:,} real of {r['padded_tokens']:,} padded tokens "
                     f"({1 - r['real_tokens'] / r['padded_tokens']:.0%} padding).")
    return "\n".join(lines + other_table(res)) + "\n"


def other_table(res: dict) -> list[str]:
    """What "other" is made of: its largest ops by self time, as shares of the whole step, and
    the non-matmul time (everything but matmuls and mask draws) against the matmul time."""
    lines = ["", f"Inside \"other\": its {TOP_OTHER} largest ops by self time, each as a share of the step (calls per step).",
             "Non-matmul / matmul: (optimizer and clipping + other) / matmuls.", "",
             "| dtype | model | non-matmul / matmul | largest ops in \"other\" |", "|---|---|---:|---|"]
    for dtype, r in res["runs"].items():
        for name in ("padded", "unpadded"):
            prof, total = r[name]["profile_s"], sum(r[name]["profile_s"].values())
            ratio = (prof["optimizer and clipping"] + prof["other"]) / prof["matmuls"]
            ops = ", ".join(f"{op.removeprefix('aten::')} {s / total:.0%} ({calls / r['steps']:.0f})"
                            for op, s, calls in r[name].get("other_ops", []))
            lines.append(f"| {dtype} | {name} | {ratio:.2f}x | {ops} |")
    return lines + floor_table(res)


def floor_table(res: dict) -> list[str]:
    """The floor (measure): what a step of the unpadded model costs with next to no tokens, and its
    non-matmul time against the full step's matmul time: the lowest non-matmul / matmul the full
    step can have while it keeps all the floor holds."""
    runs = {dtype: r for dtype, r in res["runs"].items() if "floor" in r}
    if not runs:
        return []
    tokens = next(iter(runs.values()))["floor"]["tokens"]
    lines = ["", f"The floor: the unpadded step on the same batches with each sequence cut to {tokens} tokens, what a "
             "step costs whatever its batch: its wall time (best of the rounds, as the full step's), then a profiled "
             "round (ms per step). Floor / full: its non-matmul time against the full unpadded step's matmul time, the "
             "lowest non-matmul / matmul the full step can reach while it keeps everything the floor is made of; in "
             "wall time: the same with each step's profiled shares applied to its wall time.", "",
             "| dtype | floor s/step | of the full step | profiled ms/step | matmuls | optimizer and clipping | other | "
             "floor / full | in wall time | largest ops in its \"other\" (ms/step) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for dtype, r in runs.items():
        prof, steps = r["floor"]["profile_s"], r["steps"]
        ms = {k: v / steps * 1e3 for k, v in prof.items()}
        ratio = (prof["optimizer and clipping"] + prof["other"]) / r["unpadded"]["profile_s"]["matmuls"]
        ops = ", ".join(f"{op.removeprefix('aten::')} {s / steps * 1e3:.1f}" for op, s, _ in r["floor"]["other_ops"])
        step_s, full = r["floor"]["step_s"], r["unpadded"]
        # the same ratio with each step's profiled shares applied to its unprofiled wall time (the profiler
        # adds a little to every op, and the floor is made of more, smaller ops than the full step)
        wall = (step_s * (prof["optimizer and clipping"] + prof["other"]) / sum(prof.values())) / (
            full["step_s"] * full["profile_s"]["matmuls"] / sum(full["profile_s"].values()))
        lines.append(f"| {dtype} | {step_s:.3f} | {step_s / full['step_s']:.0%} | {sum(ms.values()):.0f} | "
                     f"{ms['matmuls']:.0f} | {ms['optimizer and clipping']:.0f} | "
                     f"{ms['other']:.0f} | {ratio:.2f}x | {wall:.2f}x | {ops} |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GLUE MRPC folder")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="default: the physical cores")
    args = p.parse_args(argv)
    os.environ.update(ts.OFFLINE_ENV)
    import torch

    from nlpwf.runtime import allocator, hugepages, isa, threads

    torch.set_num_threads(args.threads or threads.physical_cores())
    heap = hugepages.HeapPages()
    res = {"allocator": allocator.prepare(announce=False),  # as a training job sets it up (runtime.process)
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "isa": isa.detect().summary(),
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "command": "python benchmarks/step_profile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()), "runs": {}}
    batches, (cfg, task) = training_batches(args.data, args.batches)
    for dtype in args.dtypes.split(","):
        print(f"{dtype} ...", flush=True)
        res["runs"][dtype] = measure(dtype, batches, cfg, task, args.rounds, heap)
    res["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    res["huge_pages"] = heap.status
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_profile.json").write_text(json.dumps(res, indent=1))
    md = render(res)
    (args.out / "step_profile.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
