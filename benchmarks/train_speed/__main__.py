"""The command line: `python benchmarks/train_speed.py [flags]` (the script runs main() here).
Measures the sections asked for, carries the others over from the previous results and writes
the report."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from . import __doc__ as about
from .allreduce import measure_allreduce, scaling_model
from .flops import sample_peaks
from .parity import measure_parity
from .report import machine, write_report
from .throughput import loss_traces, measure_throughput
from .tta import measure_time_to_accuracy, steps_per_epoch
from .variants import ACCURACY_VARIANTS, ARCH, AUTO, DEFAULT_DATA, OFFLINE_ENV, RESULTS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=about.split("\n")[0])
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
