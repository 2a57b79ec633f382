"""Section 2, training throughput: samples/s, tokens/s and FLOP/s of every variant taking turns,
per-turn rates for the by-round ratios, and the per-step loss traces of variants with the same maths."""
from __future__ import annotations

import statistics
from pathlib import Path

from .flops import sample_peaks, train_flops
from .scheduler import start_workers, take_turns
from .variants import COMMON, LOSS_PAIRS, MODEL_ARGS, PLAIN, THROUGHPUT_VARIANTS, VARIANTS, WARMUP_STEPS


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
