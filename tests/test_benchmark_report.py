"""benchmarks/train_speed: the ratios of its report, computed from turn records the test writes
with known step times (no timing of this machine), and the documented `--render` command."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
BATCH = (16, 64, 60, 30, 16 * 50, 16 * 50 * 50)  # recorder.mask_shape of a batch of 16 pairs of 50 tokens
STEPS_PER_TURN = 5


@pytest.fixture
def ts(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as when a script in benchmarks/ runs
    import train_speed

    return train_speed


def run(step_s: list[float], unpad: str = "off") -> dict:
    """A worker's record: STEPS_PER_TURN steps per turn, each taking that turn's `step_s`."""
    steps, turns, clock = [], [], 0.0
    for s in step_s:
        for _ in range(STEPS_PER_TURN):
            clock += s
            steps.append(clock)
        turns.append((clock, len(steps)))
    return {"steps": steps, "batches": [BATCH] * len(steps), "turns": turns[:-1], "allocator": "system",
            "activation_dtype": None, "unpad": unpad, "losses": [0.7] * len(steps)}


def result(ts, runs: dict[str, dict]) -> dict:
    stats = {name: ts.throughput_stats("minilm_l6", r, warmup=1) for name, r in runs.items()}
    return {"date": "2026-01-01 00:00 UTC", "threads": 2, "auto_precision": "bf16", "command": "python benchmarks/train_speed.py",
            "target": 0.84, "gemm_n": 2048, "load_before": "0.0", "load_after": "0.0", "peaks": {"fp32": 1e12, "bf16": 1e13},
            "machine": {"cpu": "test CPU", "cores": 2, "isa": "avx512", "avx512_bf16": False, "amx": False, "torch": "2",
                        "ipex": "no", "allocator_available": "none"},
            "throughput": {"minilm_l6": stats}}


def throughput_cells(md: str) -> dict[str, dict[str, str]]:
    lines = md.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| model | variant | samples/s"))
    headers = [c.strip() for c in lines[at].strip("|").split("|")]
    rows = {}
    for line in lines[at + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[1]] = dict(zip(headers, cells, strict=True))
    return rows


def test_ratios_divide_by_the_faster_plain_variant_and_pair_up_by_round(ts):
    # In the last round a load burst slows fast-fp32's turn 4x but plain-fp32-eager's not at all:
    # whole-run rates see it, the median of same-round ratios does not.
    res = result(ts, {"seed": run([1.0] * 5), "plain-fp32": run([0.5] * 5), "plain-fp32-eager": run([0.4] * 5),
                      "fast-fp32": run([0.2] * 4 + [0.8], unpad="on, last layer for the pooled token only")})
    rows = throughput_cells(ts.report.render_markdown(res))
    # measured window: the 23 steps after the warm-up step; fast-fp32 3+10+5 steps at 0.2 s and 5 at 0.8 s
    fast, eager, plain, seed = 368 / 7.6, 368 / 9.2, 368 / 11.5, 16 / 1.0
    assert rows["fast-fp32"]["samples/s"] == f"{fast:.1f}"
    assert rows["fast-fp32"]["× plain"] == f"{fast / eager:.2f}" == "1.21"  # the eager peer is the faster plain one
    assert rows["fast-fp32"]["× plain, by round"] == "2.00"  # rounds 1-4: 80 / 40 samples/s
    assert rows["fast-fp32"]["× seed"] == f"{fast / seed:.2f}" and rows["fast-fp32"]["× seed, by round"] == "5.00"
    assert rows["plain-fp32"]["× plain"] == f"{plain / eager:.2f}"
    assert rows["seed"]["turn CV"] == "0%" and rows["fast-fp32"]["turn CV"] != "0%"


def test_without_a_seed_or_plain_peer_the_ratio_cells_say_so(ts):
    res = result(ts, {"fast-bf16": run([0.2] * 3)})
    res["loss_traces"] = {"minilm_l6": ts.throughput.loss_traces({"fast-bf16": {"losses": []}, "plain-bf16": {"losses": []}})}
    md = ts.report.render_markdown(res)
    row = throughput_cells(md)["fast-bf16"]
    assert [row[h] for h in ("× seed", "× seed, by round", "× plain", "× plain, by round")] == ["-"] * 4
    assert "| minilm_l6 | fast-bf16 | plain-bf16 | 0 | - | - | - |" in md.splitlines()


def test_render_command_rewrites_the_report_from_a_results_file(ts, tmp_path):
    res = result(ts, {"seed": run([1.0] * 3), "fast-fp32": run([0.25] * 3)})
    (tmp_path / "in.json").write_text(json.dumps(res))
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "train_speed.py"), "--render", str(tmp_path / "in.json"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "out" / "train_speed.md").read_text()
    assert md == ts.report.render_markdown(res) and proc.stdout.startswith(md)
    assert throughput_cells(md)["fast-fp32"]["× seed"] == "4.00"
    assert json.loads((tmp_path / "out" / "train_speed.json").read_text()) == res
    assert (tmp_path / "out" / "throughput.png").stat().st_size > 0


def test_sections_not_run_are_carried_over_with_the_date_of_their_run(ts, tmp_path):
    main = importlib.import_module("train_speed.__main__")
    old = {"date": "2025-06-01 10:00 UTC", "allreduce": {"parameters": {"minilm_l6": 22_700_000},
           "seconds": {"minilm_l6/float32": 0.09, "minilm_l6/bfloat16": 0.05}}, "scaling": {}}
    (tmp_path / "train_speed.json").write_text(json.dumps(old))
    res = result(ts, {"seed": run([1.0] * 3)})
    main.carry_over(res, tmp_path / "train_speed.json")
    assert res["allreduce"] == old["allreduce"] and res["carried_over"] == {"allreduce": "2025-06-01 10:00 UTC"}
    md = ts.report.render_markdown(res)
    assert "From the earlier run of 2025-06-01 10:00 UTC (not re-run this time)." in md
    assert "| minilm_l6 | 22.7 M | 90 ms | 50 ms |" in md.splitlines()


def test_step_profile_names_what_other_is_made_of(monkeypatch):
    """step_profile's report: the non-matmul / matmul ratio and the largest ops inside "other",
    from a result the test writes (no profiling here)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    step_profile = importlib.import_module("step_profile")
    prof = {"matmuls": 2.0, "dropout masks": 0.5, "optimizer and clipping": 0.5, "other": 1.0}
    run = {"step_s": 0.25, "profile_s": prof, "other_ops": [("aten::copy_", 0.6, 40), ("aten::fill_", 0.4, 8)]}
    res = {"date": "today", "isa": "a CPU", "threads": 2, "torch": "2", "command": "c", "load_before": "0", "load_after": "0",
           "runs": {"bf16": {"steps": 4, "real_tokens": 70, "padded_tokens": 100, "padded": run, "unpadded": run,
                             "speedup": 1.0, "bound": 1.0, "max_loss_diff": 0.0}}}
    md = step_profile.render(res)
    assert "| bf16 | unpadded | 0.75x | copy_ 15% (10), fill_ 10% (2) |" in md


def test_step_profile_floor_reports_the_short_step_against_the_full_steps_matmuls(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    step_profile = importlib.import_module("step_profile")
    full = {"step_s": 0.25, "profile_s": {"matmuls": 2.0, "dropout masks": 0.0, "optimizer and clipping": 0.5, "other": 1.0},
            "other_ops": []}
    floor = {"tokens": 8, "step_s": 0.05, "profile_s": {"matmuls": 0.1, "dropout masks": 0.0, "optimizer and clipping": 0.4, "other": 0.3},
             "other_ops": [("aten::copy_", 0.2, 40)]}
    res = {"date": "today", "isa": "a CPU", "threads": 2, "torch": "2", "command": "c", "load_before": "0", "load_after": "0",
           "runs": {"bf16": {"steps": 4, "real_tokens": 70, "padded_tokens": 100, "padded": full, "unpadded": full,
                             "speedup": 1.0, "bound": 1.0, "max_loss_diff": 0.0, "floor": floor}}}
    md = step_profile.render(res)
    # a fifth of the full step's wall time; profiled per step: 200 ms in all, 25 matmuls, 100 optimizer, 75 other;
    # (0.4 + 0.3) / 2.0 of the full step's matmuls; in wall time (0.05 x 0.7 / 0.8) / (0.25 x 2.0 / 3.5)
    assert "| bf16 | 0.050 | 20% | 200 | 25 | 100 | 75 | 0.35x | 0.31x | copy_ 50.0 |" in md.splitlines()


def test_step_profile_floor_batches_are_short_and_still_padded(monkeypatch):
    """The floor's batches keep padding in every other sequence, so the unpadded forward packs
    them rather than running the stock forward (which it does for a batch without padding)."""
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    step_profile = importlib.import_module("step_profile")
    from transformers import BertConfig, BertForSequenceClassification

    from nlpwf.training import bert_parts, unpad

    mask = torch.ones(4, 20, dtype=torch.long)
    mask[2, 15:] = 0
    batch = {"input_ids": torch.arange(80).view(4, 20) % 50, "token_type_ids": torch.zeros(4, 20, dtype=torch.long),
             "attention_mask": mask, "labels": torch.tensor([0, 1, 0, 1])}
    (short,) = step_profile.floor_batches([batch], tokens=5)
    assert short["input_ids"].shape == (4, 5) and torch.equal(short["labels"], batch["labels"])
    assert short["attention_mask"].sum(dim=1).tolist() == [5, 4, 5, 4]
    assert int(batch["attention_mask"].sum()) == 75  # the full batch is left as it was
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=16))
    assert unpad._can_pack(model, bert_parts.read(model), short["input_ids"], short["attention_mask"], None, {})
