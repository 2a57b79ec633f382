"""Does `training.torch_compile=true` pay on this machine? minilm_l6, eager against compiled, in one run.

    python benchmarks/compile_speed.py            # about 20 minutes on 2 cores
    python benchmarks/compile_speed.py --quick    # a smoke run

Four workers train `experiment=mrpc_minilm` (fp32 and bf16, each eager and compiled) through
nlpwf's real training path (eager with its default unpadded training; compiled runs train padded,
as `perf.unpad` steps aside under torch.compile), taking turns exactly as in train_speed.py so that machine noise
hits all of them alike. Dynamic padding is kept: dynamo recompiles once for a second sequence
length and then treats the length as dynamic. Reported per variant: steady-state samples/s
after the warm-up steps, and the own time those warm-up steps took (where compiling happens);
from the two, the number of steps after which compiling has paid for itself.

Writes benchmarks/results/compile_speed.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed as ts  # noqa: E402  (the turn-taking workers and their statistics)

COMPILE = ["training.torch_compile=true"]
VARIANTS = {"fp32": ts.VARIANTS["fast-fp32"], "fp32-compile": ts.VARIANTS["fast-fp32"] + COMPILE,
            "bf16": ts.VARIANTS["fast-bf16"], "bf16-compile": ts.VARIANTS["fast-bf16"] + COMPILE}


def measure(args, tmp: Path) -> dict:
    specs = {v: {"overrides": o + ts.MODEL_ARGS["minilm_l6"] + ts.COMMON + [
                f"dataset.data_dir={args.data}", "training.num_train_epochs=100", "training.eval_strategy=no",
                "dataset.max_eval_samples=8"],
                 "threads": args.threads, "turn_s": args.turn_s, "budget_s": args.budget_s, "preload": True}
             for v, o in VARIANTS.items()}
    runs = ts.take_turns(ts.start_workers(specs, tmp))
    out = {}
    for name in VARIANTS:
        out[name] = ts.throughput_stats("minilm_l6", runs[name], args.warmup)
        out[name]["warmup_s"] = runs[name]["steps"][args.warmup]  # own time from worker start: set-up, compile, first steps
    return out


def render(res: dict) -> str:
    m = res["machine"]
    lines = [f"# torch.compile for training, {res['date']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}. Load average before/after: "
             f"{res['load_before']} / {res['load_after']}. Command: `{res['command']}`. minilm_l6, "
             f"`experiment=mrpc_minilm` (dynamic padding, batch 16), {res['threads']} threads; steady state "
             f"after {res['warmup']} warm-up steps; warm-up time counts set-up and compiling.", "",
             "| variant | samples/s | × eager | turn CV | warm-up time | compiling pays after |",
             "|---|---:|---:|---:|---:|---:|"]
    v = res["variants"]
    for name, s in v.items():
        eager = v[name.removesuffix("-compile")]
        cv = f"{s['turn_rate_cv']:.0%}" if s["turn_rate_cv"] is not None else "-"
        pays = "-"
        if name.endswith("-compile"):
            saved = 1 / eager["samples_per_s"] - 1 / s["samples_per_s"]  # seconds saved per sample
            extra = s["warmup_s"] - eager["warmup_s"]
            pays = f"{extra / saved / 3668:.1f} epochs" if saved > 0 else "never (slower)"
        lines.append(f"| {name} | {s['samples_per_s']:.1f} | {s['samples_per_s'] / eager['samples_per_s']:.2f} | {cv} | "
                     f"{s['warmup_s']:.0f} s | {pays} |")
    lines += ["", "Epochs of MRPC train (3,668 pairs) after which the compiled variant's extra warm-up "
              "time is repaid by its faster steps."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: short turns and budgets")
    p.add_argument("--data", type=Path, default=ts.DEFAULT_DATA, help="GLUE MRPC folder (train.tsv, dev.tsv)")
    p.add_argument("--out", type=Path, default=ts.RESULTS)
    p.add_argument("--threads", type=int, default=None, help="threads per variant (default: all cores)")
    a = p.parse_args(argv)
    from nlpwf.runtime import threads

    a.threads = a.threads or threads.physical_cores()
    # budgets are own time from worker start, so they include compiling
    a.turn_s, a.budget_s, a.warmup = (5, 60, 5) if a.quick else (15, 200, 40)
    return a


def main(argv=None) -> None:
    args = parse_args(argv)
    if not (args.data / "train.tsv").is_file():
        sys.exit(f"{args.data} has no train.tsv: pass --data DIR (a GLUE MRPC folder)")
    os.environ.update(ts.OFFLINE_ENV)
    res = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": ts.machine(), "threads": args.threads,
           "command": "python benchmarks/compile_speed.py" + (" --quick" if args.quick else ""), "warmup": args.warmup,
           "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    tmp = Path(tempfile.mkdtemp(prefix="nlpwf-compile-"))
    try:
        res["variants"] = measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_speed.json").write_text(json.dumps(res, indent=1, default=str))
    md = render(res)
    (args.out / "compile_speed.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
