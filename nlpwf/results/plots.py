"""Pictures of results: a run's training curves, a sweep's objective against each swept value.

matplotlib's Agg backend: no display on a cluster node. A plot is a convenience, so a failure
to draw one is logged, never fatal.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

log = logging.getLogger(__name__)

RUN_PLOT = "training_curves.png"
SWEEP_PLOT = "sweep.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(float(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    return [p[0] for p in points], [p[1] for p in points]


def training_curves(train_log: Path, out: Path) -> Path | None:
    """Training (and eval) loss, and eval accuracy and F1, over steps, from train_log.csv."""
    try:
        with Path(train_log).open() as f:
            rows = list(csv.DictReader(f))
        plt = _pyplot()
        fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(11, 4))
        for key, label in (("loss", "training loss"), ("eval_loss", "eval loss")):
            x, y = _series(rows, key)
            if x:
                loss_ax.plot(x, y, marker="." if key == "loss" else "o", label=label)
        for key, label in (("eval_accuracy", "eval accuracy"), ("eval_f1", "eval F1")):
            x, y = _series(rows, key)
            if x:
                score_ax.plot(x, y, marker="o", label=label)
        loss_ax.set(xlabel="step", ylabel="loss", title="loss")
        score_ax.set(xlabel="step", ylabel="score", title="evaluation", ylim=(0, 1))
        for ax in (loss_ax, score_ax):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return Path(out)
    except Exception as e:  # never fail a finished run over a picture
        log.warning("could not draw %s: %s", out, e)
        return None


def swept_values(rows: list[dict]) -> dict[str, list[str]]:
    """Per parameter that varies across the rows, its value in each row ('' where unset)."""
    parsed = [dict(o.split("=", 1) for o in r["overrides"].split() if "=" in o) for r in rows]
    keys = sorted({k for p in parsed for k in p})
    values = {k: [p.get(k, "") for p in parsed] for k in keys}
    return {k: v for k, v in values.items() if len(set(v)) > 1}


def _as_numbers(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def sweep(rows: list[dict], objective: str, out: Path) -> Path | None:
    """One panel per swept parameter: the objective of each finished job against its value."""
    try:
        done = [r for r in rows if isinstance(r.get(objective), (int, float))]
        params = swept_values(done)
        if not params:
            return None
        plt = _pyplot()
        fig, axes = plt.subplots(1, len(params), figsize=(4.5 * len(params), 3.8), squeeze=False)
        y = [r[objective] for r in done]
        for ax, (name, values) in zip(axes[0], params.items()):
            numbers = _as_numbers(values)
            if numbers is not None:
                ax.scatter(numbers, y)
                if min(numbers) > 0 and max(numbers) / min(numbers) >= 100:
                    ax.set_xscale("log")  # learning rates, weight decays
            else:
                categories = sorted(set(values))
                ax.scatter([categories.index(v) for v in values], y)
                ax.set_xticks(range(len(categories)), categories, rotation=30)
            ax.set(xlabel=name, ylabel=objective)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return Path(out)
    except Exception as e:
        log.warning("could not draw %s: %s", out, e)
        return None
