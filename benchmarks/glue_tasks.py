"""GLUE tasks with MiniLM-L6 on this machine: CoLA, SST-2 and STS-B from GLUE's own folders.

    python benchmarks/glue_tasks.py                              # all three, one after another
    python benchmarks/glue_tasks.py --tasks stsb --extra training.learning_rate=1e-4
    python benchmarks/glue_tasks.py --render benchmarks/results/glue_tasks.json   # redraw the report only

Each task is one `python -m nlpwf dataset=TASK dataset.data_dir=DIR model=minilm_l6 ...` job
(the command a user types; its recipe is RECIPES below plus --extra), scored on GLUE's dev
split. Then the trained STS-B and CoLA models predict a few dev rows with `stage=predict`
(scores, and label names). Jobs run one at a time, as the machine is shared; the load average
before and after each is recorded. Writes results/glue_tasks.md and results/glue_tasks.json;
the jobs' dirs stay under --work (benchmarks/.work/, never committed).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from nlpwf.runtime import isa

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "results" / "glue_tasks.md"
RESULTS_JSON = HERE / "results" / "glue_tasks.json"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# GLUE folder name, the recipe (overrides after the task and its folder), and the targets.
TASKS = {
    "cola": {"folder": "CoLA", "target": ("eval_matthews_correlation", 0.30)},
    "sst2": {"folder": "SST-2", "target": ("eval_accuracy", 0.88)},
    "stsb": {"folder": "STS-B", "target": ("eval_spearmanr", 0.84)},
}
COMMON = ["model=minilm_l6", "precision=bf16", "training.save_strategy=no"]
RECIPES = {
    # CoLA: its preset (lr 3e-5, batch 8, 6% warmup, dropout off); the recipes tried, with their scores, are
    # in benchmarks/README.md (GLUE tasks).
    "cola": ["experiment=cola_minilm"],
    "sst2": ["dataset.max_train_samples=20000"],
    "stsb": [],
}
# bert-base-cased on GLUE dev with run_glue.py (3 epochs, batch 32, lr 2e-5, max length 128): the
# results table of transformers' examples/pytorch/text-classification/README.md.
BERT_BASE = {"cola": "Matthews 56.53", "sst2": "accuracy 92.32", "stsb": "Pearson 88.64 / Spearman 88.48"}
SHOWN = {
    "cola": [("Matthews corr.", "eval_matthews_correlation"), ("accuracy", "eval_accuracy")],
    "sst2": [("accuracy", "eval_accuracy")],
    "stsb": [("Pearson", "eval_pearson"), ("Spearman", "eval_spearmanr")],
}


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def nlpwf(job: Path, *overrides: str) -> tuple[dict, float, list[str]]:
    """One job: (its metrics.json, wall seconds, the command)."""
    cmd = [sys.executable, "-m", "nlpwf", *overrides, f"hydra.run.dir={job}"]
    print("+", " ".join(cmd), flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV})
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"job failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads((job / "metrics.json").read_text()), seconds, cmd


def sample_inputs(task: str, folder: Path, out: Path, n: int = 4) -> Path:
    """The first dev rows as a file with the model's text columns (what a user would predict on)."""
    with (folder / "dev.tsv").open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task == "cola":  # headerless: source, label, original mark, sentence
        lines = ["sentence\tgold"] + [f"{r[3]}\t{['unacceptable', 'acceptable'][int(r[1])]}" for r in rows[:n]]
    else:
        header = rows[0]
        at = [header.index(c) for c in ("sentence1", "sentence2", "score")]
        lines = ["sentence1\tsentence2\tgold"] + ["\t".join(r[i] for i in at) for r in rows[1:n + 1]]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def run_task(task: str, args) -> dict:
    folder = args.glue / TASKS[task]["folder"]
    job = args.work / task
    before = load_average()
    overrides = [f"dataset={task}", f"dataset.data_dir={folder}", *COMMON, *RECIPES[task], *args.extra]
    metrics, seconds, _ = nlpwf(job, *overrides)
    out = {"task": task, "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}", "overrides": overrides,
           "metrics": metrics, "wall_s": round(seconds, 1),
           "load_before": before, "load_after": load_average()}
    if task in ("cola", "stsb"):
        source = sample_inputs(task, folder, args.work / f"{task}_sample.tsv")
        predicted, _, _ = nlpwf(args.work / f"{task}_predict", "stage=predict", f"stage.model_path={job / 'model'}",
                                f"stage.input={source}")
        out["predictions"] = (Path(predicted["output"])).read_text(encoding="utf-8")
    return out


def render(results: dict) -> str:
    runs = results["runs"]
    lines = ["# GLUE tasks: MiniLM-L6 on this machine", "",
             f"{results['machine']}; produced by `benchmarks/glue_tasks.py`. On the shared 2-core "
             f"machine: a job with `compute.threads_per_process=1` ran beside one other such job, each on a core of its own "
             f"(unpinned); the others ran alone on both cores (load average before / after each job in the table).", "",
             "| Task | Metric | MiniLM-L6 (nlpwf) | target | bert-base-cased (run_glue README) | train examples × epochs | wall "
             "| load before / after | run |",
             "|---|---|---|---|---|---|---:|---|---|"]
    for run in runs:
        m, task = run["metrics"], run["task"]
        shown = " / ".join(f"{100 * m[key]:.2f}" for _, key in SHOWN[task])
        names = " / ".join(name for name, _ in SHOWN[task])
        key, target = TASKS[task]["target"]
        met = "met" if m[key] >= target else "**not met**"
        epochs = m.get("epoch") or m.get("train_epochs") or ""
        target_name = next(name for name, k in SHOWN[task] if k == key)
        lines.append(f"| {task} | {names} | {shown} | {target_name} ≥ {100 * target:.0f}: {met} | "
                     f"{BERT_BASE[task]} | {m['train_pairs']:,} × {epochs:g} | {run['wall_s'] / 60:.1f} min | "
                     f"{run['load_before']} / {run['load_after']} | {run['date']} |")
    lines += ["", "Commands (run from the repository root, GLUE folders as GLUE distributes them):", ""]
    for run in runs:
        lines.append(f"- {run['task']}: `python -m nlpwf {' '.join(run['overrides'])}`")
    lines += ["", "Wall time is the whole job: start-up, reading the GLUE files into the Arrow cache (cached after the "
              "first run), tokenising, training, the evaluation after each epoch, saving the model.", ""]
    for run in runs:
        if "predictions" in run:
            lines += [f"`stage=predict` with the {run['task']} model on the first dev rows (the `gold` column is GLUE's label):",
                      "", "```", run["predictions"].rstrip(), "```", ""]
    return "\n".join(lines)


def machine() -> str:
    return f"{isa.detect().cpu}, {os.cpu_count()} cores"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--glue", type=Path, default=HERE.parent.parent / "shared" / "data" / "glue", help="folder of GLUE task folders")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--work", type=Path, default=HERE / ".work" / "glue_tasks")
    p.add_argument("--extra", nargs="*", default=[], help="overrides added to every task's job")
    p.add_argument("--render", type=Path, help="only redraw results/glue_tasks.md from this JSON")
    args = p.parse_args(argv)
    if args.render:
        RESULTS_MD.write_text(render(json.loads(args.render.read_text())))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        run = run_task(task, args)
        # Read the results again only now: another run of this script (another task) may have written since.
        previous = json.loads(RESULTS_JSON.read_text())["runs"] if RESULTS_JSON.is_file() else []
        runs = {**{r["task"]: r for r in previous}, task: run}
        results = {"machine": machine(), "runs": [runs[t] for t in TASKS if t in runs]}
        RESULTS_JSON.write_text(json.dumps(results, indent=2) + "\n")
        RESULTS_MD.write_text(render(results))
    print(RESULTS_MD.read_text())


if __name__ == "__main__":
    main()
