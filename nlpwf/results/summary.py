"""The sweep summary: summary.csv, a table and a plot at the end of each batch of a --multirun,
one row per job, overrides then metrics. Both of nlpwf's launchers write it."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from hydra.core.utils import JobReturn, JobStatus

from nlpwf.results import files, plots

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.csv"
METRIC_COLUMNS = ["eval_accuracy", "eval_f1", "eval_loss", "train_loss", "train_runtime", "train_samples_per_second"]


def metric_columns(objective: str | None) -> list[str]:
    """METRIC_COLUMNS, and the job's objective when it is another metric (CoLA's Matthews, STS-B's Spearman)."""
    return METRIC_COLUMNS + ([objective] if objective and objective not in METRIC_COLUMNS else [])


def row(run: JobReturn, label: str | None = None, objective: str | None = None) -> dict:
    job_dir = Path(run.hydra_cfg.hydra.runtime.output_dir) if run.hydra_cfg else None
    metrics = (files.read_metrics(job_dir) if job_dir else None) or {}
    out = {
        "job": run.hydra_cfg.hydra.job.num if run.hydra_cfg else "",
        "overrides": " ".join(run.overrides or []),
        "status": status(run, metrics, label),
    }
    out.update({k: metrics.get(k, "") for k in metric_columns(objective)})
    # A failed job's exception: JobReturn.return_value re-raises it (and writes to stderr), so the
    # stored value is read directly; Hydra has no public accessor that only returns it.
    out["error"] = str(run._return_value) if run.status == JobStatus.FAILED else ""
    out["job_dir"] = str(job_dir or "")
    return out


def status(run: JobReturn, metrics: dict, label: str | None = None) -> str:
    """Hydra's status, or the launcher's `label` for a job that completed without training here
    (the Azure ML launcher's DRY_RUN, or SUBMITTED when it does not wait). Metrics that came
    back mean the job trained: COMPLETED. The launcher decides the label; nothing here reads
    the launcher's settings."""
    if label and run.status == JobStatus.COMPLETED and not metrics:
        return label
    return run.status.name


class Summary:
    """Accumulates rows across the sweeper's batches and rewrites summary.csv after each."""

    def __init__(self, sweep_dir: str | Path, objective: str | None) -> None:
        self.path = Path(sweep_dir) / SUMMARY_FILE
        self.objective = objective
        self.rows: list[dict] = []

    def add(self, runs: Sequence[JobReturn], labels: Sequence[str | None] | None = None) -> None:
        self.rows.extend(row(r, label, self.objective) for r, label in zip(runs, labels or [None] * len(runs)))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        files.write_csv(self.path, self.rows, list(self.rows[0]))
        plots.sweep(self.rows, self.objective, self.path.parent / plots.SWEEP_PLOT)
        log.info("sweep summary (%s):\n%s", self.path, self.table())

    def table(self) -> str:
        cols = ["job", "overrides", "status"] + METRIC_COLUMNS[:4] + metric_columns(self.objective)[len(METRIC_COLUMNS):]
        cells = [[_fmt(r[c]) for c in cols] for r in self.rows]
        widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(x.ljust(w) for x, w in zip(cells_row, widths)) for cells_row in cells]
        best = self.best()
        if best:
            lines.append(f"best {self.objective}: {_fmt(best[self.objective])} (job {best['job']}: {best['overrides']})")
        return "\n".join(lines)

    def best(self) -> dict | None:
        done = [r for r in self.rows if isinstance(r.get(self.objective), (int, float))]
        return max(done, key=lambda r: r[self.objective]) if done else None


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
