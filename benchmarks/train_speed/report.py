"""The report: train_speed.json as run, train_speed.md rendered from it, and the plots. Each
Markdown table is a list of columns (header, cell of a row, alignment) and a list of rows, so
that a column is added or changed in one place; rendering reads only the JSON, never this machine."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, NamedTuple

from . import plots
from .allreduce import D32
from .throughput import paired_ratio
from .variants import AUTO, DTYPE, PLAIN


class Column(NamedTuple):
    header: str
    cell: Callable[[dict], str]
    left: bool = False  # text columns align left, numbers right


def table(columns: list[Column], rows) -> list[str]:
    return ["| " + " | ".join(c.header for c in columns) + " |",
            "|" + "".join("---|" if c.left else "---:|" for c in columns),
            *("| " + " | ".join(c.cell(r) for c in columns) + " |" for r in rows)]


def fmt(value, spec: str) -> str:
    """`value` formatted, or "-" where there is none."""
    return "-" if value is None else format(value, spec)


def machine() -> dict:
    import torch

    from nlpwf.runtime import affinity, allocator, isa

    found = isa.detect()
    return {"cpu": found.cpu, "cores": len(affinity.physical_core_groups(os.sched_getaffinity(0))),
            "isa": found.summary(), "isa_flags": found.as_dict(),
            "avx512_bf16": found.avx512_bf16, "amx": found.amx_bf16, "torch": torch.__version__,
            # nlpwf no longer uses IPEX (retired upstream): the field stays for the report's layout
            "ipex": "no", "allocator_available": allocator.find_allocator() or "none"}


def write_report(res: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_speed.json").write_text(json.dumps(res, indent=1, default=str))
    md = render_markdown(res)
    (out / "train_speed.md").write_text(md)
    plots.plot(res, out)
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
    for section in (throughput_section, loss_trace_section, tta_section, parity_section, scaling_section):
        lines += section(res)
    return "\n".join(lines) + "\n"


def from_earlier(res: dict, section: str) -> list[str]:
    carried = res.get("carried_over", {})
    return [f"From the earlier run of {carried[section]} (not re-run this time).", ""] if section in carried else []


# ---- throughput ----------------------------------------------------------------------------

def computed_flops(s: dict) -> float:
    """FLOP/s the encoder's dense layers computed: padded, unpadded, or unpadded with the last
    layer for the pooled token only, as the variant's unpad note says."""
    unpad = str(s.get("unpad") or "-")
    if not unpad.startswith("on"):
        return s["hardware_flops_per_s"]
    return s["pooled_only_flops_per_s"] if "pooled" in unpad else s["model_flops_per_s"]


def ratio_columns(peer: str) -> list[Column]:
    """The row's rate ÷ its peer's ("seed" or "plain"): over the whole run, and by round; "-"
    where the run has no such peer."""
    return [Column(f"× {peer}", lambda r: fmt(r["s"]["samples_per_s"] / r[peer]["samples_per_s"] if r[peer] else None, ".2f")),
            Column(f"× {peer}, by round", lambda r: fmt(paired_ratio(r["s"], r[peer]) if r[peer] else None, ".2f"))]


THROUGHPUT = [
    Column("model", lambda r: r["model"], left=True),
    Column("variant", lambda r: r["name"], left=True),
    Column("samples/s", lambda r: f"{r['s']['samples_per_s']:.1f}"),
    Column("tokens/s", lambda r: f"{r['s']['tokens_per_s']:.0f}"),
    *ratio_columns("seed"),
    *ratio_columns("plain"),
    Column("padded len", lambda r: f"{r['s']['mean_padded_length']:.0f}"),
    Column("model GFLOP/s", lambda r: f"{r['s']['model_flops_per_s'] / 1e9:.0f}"),
    Column("MFU", lambda r: f"{r['s']['model_flops_per_s'] / r['peak']:.1%}"),
    Column("HFU", lambda r: f"{computed_flops(r['s']) / r['peak']:.1%}"),
    Column("turn CV", lambda r: fmt(r["s"]["turn_rate_cv"], ".0%")),
    Column("unpad", lambda r: r["s"].get("unpad") or "-", left=True),
    Column("allocator", lambda r: r["s"]["allocator"], left=True),
]


def throughput_rows(res: dict):
    """One row per model and variant, with the peers its ratios divide by: the seed (which
    --variants may leave out) and the faster plain Trainer variant of the same dtype."""
    # fast-auto's dtype as the run picked it (rendering elsewhere must not re-decide it)
    dtype = {**DTYPE, "fast-auto": res.get("auto_precision", AUTO)}
    for model, variants in res.get("throughput", {}).items():
        for name, s in variants.items():
            plain = max((v for k, v in variants.items() if k in PLAIN and dtype[k] == dtype[name]),
                        key=lambda v: v["samples_per_s"], default=None)
            yield {"model": model, "name": name, "s": s, "seed": variants.get("seed"), "plain": plain,
                   "peak": res["peaks"][dtype[name]]}


def throughput_section(res: dict) -> list[str]:
    if not res.get("throughput"):
        return []
    lines = ["", "## Throughput", "",
             "Tokens are real (non-pad) tokens; MFU = model FLOP/s on real tokens / matmul peak of the "
             "variant's dtype; HFU counts what the encoder's dense layers computed: the padded tokens, unless "
             "unpadded (then the up to 15 padding tokens a batch's rows are rounded up with are left out, and "
             "where the last layer computes only the pooled token, all it leaves out). "
             "× plain: against the faster plain transformers Trainer variant (sdpa or eager "
             "attention) in the same dtype (same data, batches, seed, flags and maths); by round: the median over "
             "the rounds of the two variants' rates in the same round (load that lasts a round hits both). "
             "Turn CV: spread of the variant's rate across its turns (machine noise).", "",
             *table(THROUGHPUT, throughput_rows(res))]
    auto = res.get("auto_precision", AUTO)
    for model, variants in res["throughput"].items():
        picked = variants.get(f"fast-{auto}")
        if variants.get("fast-auto") and picked:
            lines += ["", f"{model}: precision=auto picked {auto} on this CPU; fast-auto ÷ "
                          f"fast-{auto} = {variants['fast-auto']['samples_per_s'] / picked['samples_per_s']:.2f}."]
    return lines


LOSS_TRACES = [
    Column("model", lambda r: r["model"], left=True),
    Column("variant", lambda r: r["a"], left=True),
    Column("against", lambda r: r["b"], left=True),
    Column("steps", lambda r: str(r["steps"])),
    Column("max abs diff", lambda r: fmt(r["max_abs_diff"], ".2e")),
    Column("first 20 steps", lambda r: fmt(r["max_abs_diff_first_20"], ".2e")),
    Column("mean loss", lambda r: fmt(r["mean_loss"], ".4f")),
]


def loss_trace_section(res: dict) -> list[str]:
    if not res.get("loss_traces"):
        return []
    rows = [{"model": model, **t} for model, pairs in res["loss_traces"].items() for t in pairs]
    return ["", "### Loss traces", "",
            "Variants with the same maths on the same batches from the same seed (dropout included): the largest "
            "difference of their per-step training losses over the steps both ran, and over the first 20.", "",
            *table(LOSS_TRACES, rows)]


# ---- accuracy ------------------------------------------------------------------------------

def accuracy_by_epoch(run: dict) -> dict:
    return {round(e["epoch"], 2): e["accuracy"] for e in run["evals"]}


def minutes(seconds) -> str | None:
    return f"{seconds / 60:.1f} min" if seconds else None


TTA = [
    Column("recipe", lambda r: r["name"], left=True),
    Column("time to target", lambda r: minutes(r["time_to_target_s"]) or f"not within {r['own_s'] / 60:.1f} min"),
    Column("of which training", lambda r: minutes(r["train_time_to_target_s"]) or "-"),
    Column("epochs at target", lambda r: f"{r['epochs_at_target']:.2f}" if r["epochs_at_target"] else "-"),
    Column("best accuracy", lambda r: fmt(r["best_accuracy"], ".1%")),
    *(Column(f"acc. epoch {ep}", lambda r, ep=ep: fmt(accuracy_by_epoch(r).get(float(ep)), ".1%")) for ep in (1, 2, 3)),
    Column("trained", lambda r: f"{r['final_epoch']:.2f} ep, {r['own_s'] / 60:.1f} min"),
]


def tta_section(res: dict) -> list[str]:
    if not res.get("tta"):
        return []
    t = res["tta"]
    by_epoch = {name: accuracy_by_epoch(r) for name, r in t.items()}
    equal = [Column("epoch", lambda ep: f"{ep:.2f}"),
             *(Column(name, lambda ep, name=name: f"{by_epoch[name][ep]:.1%}") for name in t)]
    return ["", f"## Time to {res['target']:.0%} MRPC dev accuracy (minilm_l6)", "", *from_earlier(res, "tta"),
            "Own wall time of each recipe from process set-up (data, model) through training and its periodic "
            "evaluations; the two alternate turns. Accuracy at each epoch end where reached.", "",
            *table(TTA, ({"name": name, **r} for name, r in t.items())),
            "", "Accuracy at equal epochs (evaluations both recipes made):", "",
            *table(equal, sorted(set.intersection(*(set(v) for v in by_epoch.values()))))]


def parity_section(res: dict) -> list[str]:
    if not res.get("parity"):
        return []
    par = res["parity"]
    epochs = sorted({round(e["epoch"], 2) for r in par.values() for e in r["evals"]})
    base = par["seed"]["samples_per_s"]
    columns = [Column("recipe", lambda r: r["name"], left=True),
               *(Column(f"acc. epoch {ep:g}", lambda r, ep=ep: fmt(accuracy_by_epoch(r).get(ep), ".1%")) for ep in epochs),
               Column("F1 at end", lambda r: f"{r['evals'][-1]['f1']:.3f}"),
               Column("samples/s", lambda r: f"{r['samples_per_s']:.1f}"),
               Column("× seed", lambda r: f"{r['samples_per_s'] / base:.2f}"),
               Column("own time", lambda r: f"{r['own_s'] / 60:.1f} min")]
    last = {name: r["evals"][-1]["accuracy"] for name, r in par.items()}
    return ["", "## Accuracy at equal epochs (minilm_l6, full runs)", "", *from_earlier(res, "parity"),
            "Both recipes trained to the end, evaluated on MRPC dev at each epoch end, taking turns. "
            "Training samples/s over the whole run, evaluations excluded.", "",
            *table(columns, ({"name": name, **r} for name, r in par.items())),
            "", f"Final accuracy, fast-bf16 minus seed: {(last['fast-bf16'] - last['seed']) * 100:+.1f} points."]


# ---- scaling -------------------------------------------------------------------------------

SCALING = [Column("nodes", lambda cell: str(cell["nodes"])),
           *(Column(header, lambda cell, key=key: f"{cell[key]['samples_per_s']:.0f} ({cell[key]['efficiency']:.0%})")
             for header, key in (("fp32 grads", ("fp32", 1)), ("bf16 grads", ("bf16", 1)),
                                 ("fp32, accum 4", ("fp32", 4)), ("bf16, accum 4", ("bf16", 4))))]


def scaling_section(res: dict) -> list[str]:
    if not res.get("allreduce"):
        return []
    a = res["allreduce"]
    allreduce = [Column("model", lambda model: model, left=True),
                 Column("parameters", lambda model: f"{a['parameters'][model] / 1e6:.1f} M"),
                 *(Column(header, lambda model, dt=dt: f"{a['seconds'][f'{model}/{dt}'] * 1e3:.0f} ms")
                   for header, dt in (("fp32", "float32"), ("bf16 (compressed)", "bfloat16")))]
    lines = ["", "## Scaling", "", *from_earlier(res, "allreduce"),
             "Measured: one all-reduce of the model's gradients, gloo, 2 processes on loopback "
             "(1 thread each), median.", "", *table(allreduce, a["parameters"])]
    for model, rows in res.get("scaling", {}).items():
        cells = [{"nodes": nodes, **{(r["grads"], r["accum"]): r for r in rows if r["nodes"] == nodes}} for nodes in (1, 2, 4, 8)]
        lines += ["", f"Model (benchmarks/README.md) for {model}: {D32['name']} nodes ({D32['cores']} cores, "
                  f"{D32['network_gbps']:.0f} Gbit/s), 32 pairs per node per micro-step, fast-fp32 compute rate: "
                  "samples/s (scaling efficiency).", "", *table(SCALING, cells)]
    return lines
