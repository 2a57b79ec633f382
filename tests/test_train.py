"""End-to-end training through the CLI: single process, DDP, outputs."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from nlpwf.runtime import isa, threads

from conftest import TINY, run_cli

pytestmark = pytest.mark.slow  # every test here trains end to end


@pytest.fixture(scope="module")
def minilm_job(tmp_path_factory):
    """The quickstart itself (about a minute on 2 cores), evaluated before training too."""
    job = tmp_path_factory.mktemp("minilm") / "job"
    proc = run_cli("experiment=quickstart", "training.disable_tqdm=true", "+training.eval_on_start=true", f"hydra.run.dir={job}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return job, proc


def test_quickstart_learns(minilm_job):
    job, _ = minilm_job
    with (job / "train_log.csv").open() as f:
        log = list(csv.DictReader(f))
    evals = [r for r in log if r["eval_loss"]]
    losses = [float(r["loss"]) for r in log if r["loss"]]
    first, last = evals[0], evals[-1]
    assert int(first["step"]) == 0 and int(last["step"]) > 0 and len(evals) == 4  # before training, then each epoch
    assert float(last["eval_loss"]) < float(first["eval_loss"]) - 0.2
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["eval_accuracy"] > 0.75  # the dev split's majority class is 0.53


def test_job_dir_holds_every_output(minilm_job):
    job, proc = minilm_job
    metrics = json.loads((job / "metrics.json").read_text())
    for key in ("eval_accuracy", "eval_f1", "eval_loss", "train_loss", "train_runtime", "train_samples_per_second",
                "world_size", "precision"):
        assert key in metrics, key
    assert metrics["world_size"] == 1 and metrics["model"] == "minilm_l6"
    # precision=auto (the default) ran in what this CPU computes natively, and says so.
    assert metrics["precision_option"] == "auto"
    assert metrics["precision"] == ("bf16" if isa.detect().native_bf16 else "fp32")
    assert metrics["isa"]["native_bf16"] == isa.detect().native_bf16 and metrics["cpus"] == [isa.detect().summary()]
    assert (job / ".hydra" / "config.yaml").is_file() and (job / ".hydra" / "overrides.yaml").is_file()
    assert "eval_accuracy" in (job / "nlpwf.log").read_text()
    assert not [p for p in job.iterdir() if p.name.startswith(".model")]  # no staging leftovers


def test_saved_model_reloads_with_the_same_predictions(minilm_job):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    job, _ = minilm_job
    model = AutoModelForSequenceClassification.from_pretrained(job / "model").eval()
    tok = AutoTokenizer.from_pretrained(job / "model")
    enc = tok(["Shares of Contoso rose 5 percent on Monday."] * 2,
              ["Contoso stock gained 5 percent on Monday.", "Contoso stock fell 9 percent on Friday."],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = model(**enc).logits, model(**enc).logits
    assert torch.equal(a, b) and a.shape == (2, 2)
    assert not torch.equal(a[0], a[1])  # a trained head, not a constant


@pytest.mark.parametrize("layout", [["compute.processes_per_node=2"], ["nodes=2"]], ids=["1x2", "2x1"])
def test_ddp_two_processes(tmp_path, layout):
    job = tmp_path / "ddp"
    proc = run_cli(*TINY, *layout, f"hydra.run.dir={job}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["backend"] in ("gloo", "ccl")
    digests = metrics["parameter_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert metrics["threads_per_process"] == max(1, threads.physical_cores() // 2)  # cores shared, not oversubscribed
    # Rank 0 alone writes: one completion line, from rank 0.
    done = [line for line in proc.stdout.splitlines() if "model and metrics in" in line]
    assert len(done) == 1 and done[0].startswith("[rank 0]")
    assert "[rank 1]" in proc.stdout
    assert (job / "model" / "config.json").is_file() and (job / "nlpwf_job.yaml").is_file()


def test_bf16_run_records_its_precision(tmp_path):
    job = tmp_path / "bf16"
    proc = run_cli(*TINY, "precision=bf16", f"hydra.run.dir={job}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((job / "metrics.json").read_text())
    assert (metrics["precision"], metrics["precision_option"]) == ("bf16", "bf16")
    # Asked for explicitly, bf16 runs anyway; only where it is emulated does a warning say so.
    warned = "precision=auto picks what this CPU computes natively" in proc.stdout + proc.stderr
    assert warned == (not isa.detect().native_bf16)
