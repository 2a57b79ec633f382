"""The CPU fast settings are applied, and change speed, not results.

Runs train through the CLI and reads what nlpwf/perf.py recorded in metrics.json: the dtype
of the first Linear's output inside the autocast region, every training batch's padded and
real lengths, and each rank's threads and cores. No timing assertions: the machine is shared.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import TINY, run_cli
from nlpwf import distributed, perf
from nlpwf.distributed import Rank
from nlpwf.errors import UserError

# Enough pairs that group_by_length's mega-batches (up to 50 batches) hold many batches.
SHAPES = ["model=tiny_bert", "dataset.max_train_samples=400", "dataset.max_eval_samples=16", "training.num_train_epochs=1",
          "training.disable_tqdm=true", "training.per_device_train_batch_size=8", "training.eval_strategy=no"]
SEED = ["dataset.pad_to_max_length=true", "training.train_sampling_strategy=random", "precision=fp32"]
FAST = ["dataset.pad_to_max_length=false", "training.train_sampling_strategy=group_by_length", "precision=bf16"]


def train(tmp_path, name, *args):
    job = tmp_path / name
    proc = run_cli(*args, f"hydra.run.dir={job}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((job / "metrics.json").read_text()), job, proc


def losses(job) -> list[float]:
    with (job / "train_log.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")]


# ---- unit level: core sets, allocator ----------------------------------------------------

def test_core_sets_are_disjoint_and_cover_the_node():
    cpus = set(range(16))
    sets = [perf.cores_for_rank(r, 4, cpus) for r in range(4)]
    assert all(len(s) == 4 for s in sets)
    assert set().union(*sets) == cpus and sum(map(len, sets)) == 16
    assert sets[1] == {4, 5, 6, 7}  # contiguous blocks: neighbours share caches
    # More processes than cores: shared round-robin, never an empty set.
    assert [perf.cores_for_rank(r, 3, {0, 1}) for r in range(3)] == [{0}, {1}, {0}]


def test_emulated_nodes_on_one_machine_share_its_cores(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert perf.slot_on_machine(Rank(rank=1, local_rank=0, world_size=2, node_rank=1), 1) == (1, 2)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.4")  # a real cluster: only this node's ranks share it
    assert perf.slot_on_machine(Rank(rank=5, local_rank=1, world_size=8, node_rank=2), 4) == (1, 4)


@pytest.mark.skipif(perf.find_allocator() is None, reason="no jemalloc or tcmalloc installed (apt-get install libjemalloc2)")
def test_preloaded_allocator_is_detected():
    code = "from nlpwf import perf; print(perf.loaded_allocator())"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "LD_PRELOAD": ""})
    preloaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **perf.preload_env()})
    assert plain.stdout.strip() == "system"
    assert preloaded.stdout.strip() in ("jemalloc", "tcmalloc"), preloaded.stderr[-2000:]


def test_unknown_comm_hook_is_refused():
    assert perf.comm_hook("bf16").__name__ == "bf16_compress_hook"
    with pytest.raises(UserError, match="perf.ddp_comm_hook=int4"):
        perf.comm_hook("int4")


# ---- one process: autocast dtype, batch shapes, same loss ----------------------------------

@pytest.mark.parametrize("precision,dtype", [("bf16", "bfloat16"), ("fp32", "float32")])
def test_autocast_region_runs_in_the_chosen_dtype(tmp_path, precision, dtype):
    metrics, job, _ = train(tmp_path, precision, *TINY, f"precision={precision}")
    assert metrics["perf_activation_dtype"] == dtype
    assert metrics["perf_ipex"] in ("absent", "off") or metrics["perf_ipex"].startswith("ipex")
    if metrics["perf_ipex"] == "absent":  # said once, then training went on
        assert (job / "nlpwf.log").read_text().count("Intel Extension for PyTorch is not installed") == 1


@pytest.fixture(scope="module")
def shape_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shapes")
    return {name: train(tmp, name, *SHAPES, *extra)[0] for name, extra in {
        "pad128": SEED,
        "dynamic_random": ["training.train_sampling_strategy=random"],
        "dynamic_grouped": FAST,
    }.items()}


def test_seed_recipe_pads_every_batch_to_128(shape_runs):
    m = shape_runs["pad128"]
    assert m["perf_train_batches"] == 50
    assert m["perf_mean_padded_length"] == 128 and m["perf_overpadded_batches"] == 50
    assert m["perf_padding_fraction"] > 0.6


def test_dynamic_padding_pads_each_batch_to_its_longest_pair(shape_runs):
    for name in ("dynamic_random", "dynamic_grouped"):
        m = shape_runs[name]
        assert m["perf_train_batches"] == 50
        assert m["perf_overpadded_batches"] == 0, name
        assert m["perf_max_padded_length"] < 128 and m["perf_mean_padded_length"] < 64


def test_length_grouping_makes_batches_homogeneous(shape_runs):
    grouped, shuffled = shape_runs["dynamic_grouped"], shape_runs["dynamic_random"]
    assert grouped["perf_mean_length_spread"] < 0.4 * shuffled["perf_mean_length_spread"]
    assert grouped["perf_padding_fraction"] < 0.5 * shuffled["perf_padding_fraction"]


def test_dynamic_padding_gives_the_same_losses_as_padding_to_128(tmp_path):
    """Padding is masked out: the per-step losses agree to float rounding (same sampler, fp32;
    no dropout, whose masks depend on the padded shape)."""
    args = [*TINY, "training.train_sampling_strategy=random", "precision=fp32",
            "+model.config.hidden_dropout_prob=0", "+model.config.attention_probs_dropout_prob=0"]
    _, padded, _ = train(tmp_path, "pad", *args, "dataset.pad_to_max_length=true")
    _, dynamic, _ = train(tmp_path, "dyn", *args, "dataset.pad_to_max_length=false")
    a, b = losses(padded), losses(dynamic)
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3


def test_fast_and_seed_recipes_reach_the_same_loss(tmp_path):
    """MiniLM on a slice of the sample, 2 epochs: the fast recipe (dynamic padding, length
    grouping, bf16) and the seed's (pad to 128, random order, fp32) both learn, and their final
    eval losses agree within 0.05 (seed-to-seed spread of this run is about 0.02)."""
    common = ["experiment=quickstart", "dataset.max_train_samples=160", "dataset.max_eval_samples=64",
              "training.num_train_epochs=2", "training.disable_tqdm=true", "training.eval_strategy=no"]
    seed, _, _ = train(tmp_path, "seed", *common, *SEED)
    fast, _, _ = train(tmp_path, "fast", *common, *FAST)
    assert seed["eval_loss"] < 0.6 and fast["eval_loss"] < 0.6  # both learnt (chance is 0.69)
    assert abs(seed["eval_loss"] - fast["eval_loss"]) < 0.05
    assert fast["perf_mean_padded_length"] < 0.5 * seed["perf_mean_padded_length"]


# ---- two processes: threads, affinity, comm hook, no all-reduce while accumulating --------

@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    common = [*TINY, "perf.ddp_comm_hook=bf16", "training.per_device_train_batch_size=8"]  # 4 batches per rank
    return {ga: train(tmp, f"ga{ga}", *common, "compute.processes_per_node=2", f"+training.gradient_accumulation_steps={ga}")
            for ga in (1, 2)}


def test_workers_get_their_share_of_threads_and_disjoint_cores(ddp_runs):
    metrics, _, _ = ddp_runs[1]
    procs = metrics["perf_processes"]
    expected = distributed.threads_per_process(None, 2)
    assert len(procs) == 2
    for p in procs:
        assert p["torch_threads"] == expected and p["omp_num_threads"] == str(expected)
    if all(p["affinity"] == "pinned" for p in procs):
        a, b = (set(p["cores"]) for p in procs)
        assert a and b and not a & b


def test_bf16_gradient_compression_hook_is_registered(ddp_runs):
    metrics, _, _ = ddp_runs[1]
    assert metrics["perf_ddp_comm_hook"] == "bf16" and metrics["perf_ddp_comm_hook_calls"] > 0
    digests = metrics["parameter_digests"]
    assert digests[0] == digests[1]  # compressed gradients, still identical replicas


def test_gradient_accumulation_skips_the_allreduce(ddp_runs):
    """Trainer runs non-final micro-batches under accelerate's no_sync: with 2 accumulation steps
    the hook (one call per bucket per all-reduce) runs once per optimizer step, not per batch."""
    per_step = {}
    for ga, (metrics, job, _) in ddp_runs.items():
        steps = metrics["perf_train_batches"] // ga
        assert metrics["perf_ddp_comm_hook_calls"] % steps == 0
        per_step[ga] = metrics["perf_ddp_comm_hook_calls"] // steps
    assert per_step[1] == per_step[2] >= 1
