"""The report's figures: throughput.png (samples/s per variant) and accuracy_time.png."""
from __future__ import annotations

from pathlib import Path


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
