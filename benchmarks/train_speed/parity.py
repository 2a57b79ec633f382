"""Section 4, parity: both recipes on minilm_l6 trained their full epochs, taking turns: dev
accuracy at each epoch end and the training throughput ratio over the whole run."""
from __future__ import annotations

import math
from pathlib import Path

from .scheduler import start_workers, take_turns
from .variants import ACCURACY_VARIANTS, COMMON, MODEL_ARGS, VARIANTS


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
