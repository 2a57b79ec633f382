"""Section 3, time to accuracy: the seed recipe against fast-bf16 on minilm_l6, taking turns,
evaluated on MRPC dev several times an epoch, each stopping at the target accuracy or its budget."""
from __future__ import annotations

import math
from pathlib import Path

from .scheduler import start_workers, take_turns
from .variants import ACCURACY_VARIANTS, COMMON, FAST, MODEL_ARGS, VARIANTS


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


def eval_every(steps: int, per_epoch: int) -> int:
    """Eval interval dividing the epoch, so that every epoch end is evaluated (equal-epoch
    comparison), with about `per_epoch` evaluations per epoch."""
    divisors = [d for d in range(1, steps + 1) if steps % d == 0]
    return min(divisors, key=lambda d: abs(d - steps / per_epoch))


def steps_per_epoch(data: Path) -> dict:
    pairs = sum(1 for line in (data / "train.tsv").open(encoding="utf-8-sig") if line.strip()) - 1
    from hydra import compose, initialize_config_dir

    from nlpwf import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        fast = compose("config", overrides=FAST)
    return {"seed": math.ceil(pairs / 16), "fast-bf16": math.ceil(pairs / fast.training.per_device_train_batch_size)}
