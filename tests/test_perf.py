"""The CPU fast settings are applied, and change speed, not results.

Runs train through the CLI and reads what nlpwf/training/recorder.py recorded in metrics.json: the dtype
of the first Linear's output inside the autocast region, every training batch's padded and
real lengths, and each rank's threads and cores. No timing assertions: the machine is shared.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from nlpwf.errors import UserError
from nlpwf.runtime import affinity, allocator, hugepages, threads
from nlpwf.runtime.contract import Rank
from nlpwf.training import addons

from conftest import TINY, run_cli

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
    sets = [affinity.cores_for_rank(r, 4, cpus) for r in range(4)]
    assert all(len(s) == 4 for s in sets)
    assert set().union(*sets) == cpus and sum(map(len, sets)) == 16
    assert sets[1] == {4, 5, 6, 7}  # contiguous blocks: neighbours share caches
    # More processes than cores: shared round-robin, never an empty set.
    assert [affinity.cores_for_rank(r, 3, {0, 1}) for r in range(3)] == [{0}, {1}, {0}]


def test_emulated_nodes_on_one_machine_share_its_cores(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert affinity.slot_on_machine(Rank(rank=1, local_rank=0, world_size=2, node_rank=1), 1) == (1, 2)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.4")  # a real cluster: only this node's ranks share it
    assert affinity.slot_on_machine(Rank(rank=5, local_rank=1, world_size=8, node_rank=2), 4) == (1, 4)


@pytest.mark.skipif(allocator.find_allocator() is None, reason="no jemalloc or tcmalloc installed (apt-get install libjemalloc2)")
def test_preloaded_allocator_is_detected():
    code = "from nlpwf.runtime import allocator; print(allocator.loaded_allocator())"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "LD_PRELOAD": ""})
    preloaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **allocator.preload_env()})
    assert plain.stdout.strip() == "system"
    assert preloaded.stdout.strip() in ("jemalloc", "tcmalloc"), preloaded.stderr[-2000:]


# Training steps in miniature: each allocates and frees the same large tensors (above glibc's
# mmap threshold, like MiniLM's 47 MB word-embedding gradient). Page faults of the last step.
STEPS = """
import resource, sys, torch
from nlpwf.runtime import allocator
kept = allocator.keep_freed_memory() if sys.argv[1] == "keep" else False
for step in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    grad = torch.ones(12_000_000)
    activations = torch.ones(3_000_000)
    del grad
    update = torch.zeros(12_000_000)
    del activations, update
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(allocator.loaded_allocator() != "system" or not allocator.glibc(), reason="glibc malloc only")
def test_kept_freed_memory_is_reused_without_new_page_faults():
    runs = {mode: subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True).stdout.split()
            for mode in ("default", "keep")}
    assert runs["keep"][0] == "True" and runs["default"][0] == "False"
    pages = (12_000_000 + 3_000_000) * 4 // 4096  # what one step touches, once
    assert int(runs["default"][1]) > pages // 2  # every step: fresh mappings, zero-filled again
    assert int(runs["keep"][1]) < pages // 20    # the freed blocks were handed out again


def test_kernel_thp_mode_is_the_bracketed_word(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert hugepages.kernel_mode(setting) == "madvise"
    setting.write_text("[never] madvise always\n")
    assert hugepages.kernel_mode(setting) == "never"
    assert hugepages.kernel_mode(tmp_path / "absent") is None  # not Linux, or no THP in the kernel


def test_heap_and_its_huge_pages_are_read_from_proc_files():
    maps = ("55d0c1a00000-55d0c1a21000 r--p 00000000 08:01 123  /usr/bin/python3.11\n"
            "55d0c3e00000-55d0e9600000 rw-p 00000000 00:00 0                          [heap]\n"
            "7f1200000000-7f1204000000 rw-p 00000000 00:00 0 \n")
    assert hugepages.heap_span(maps) == (0x55d0c3e00000, 0x55d0e9600000)
    assert hugepages.heap_span(maps.replace("[heap]", "")) is None
    # advised, the heap's later growth is a mapping of its own, also [heap]: the span covers both
    grown = maps.replace(" \n", " \n55d0e9600000-55d0f0000000 rw-p 00000000 00:00 0  [heap]\n", 1)
    assert hugepages.heap_span(grown) == (0x55d0c3e00000, 0x55d0f0000000)
    smaps = ("55d0c1a00000-55d0c1a21000 r--p 00000000 08:01 123  /usr/bin/python3.11\nAnonHugePages:     4096 kB\n"
             "55d0c3e00000-55d0e9600000 rw-p 00000000 00:00 0  [heap]\nRss:  614400 kB\nAnonHugePages:   612352 kB\n"
             "55d0e9600000-55d0f0000000 rw-p 00000000 00:00 0  [heap]\nRss:  108544 kB\nAnonHugePages:   108544 kB\n")
    assert hugepages.huge_bytes(0x55d0c3e00000, 0x55d0e9600000, smaps) == 612352 * 1024  # that heap mapping's only
    assert hugepages.huge_bytes(0x55d0c3e00000, 0x55d0f0000000, smaps) == (612352 + 108544) * 1024
    assert hugepages.huge_bytes(0x1000, 0x2000, smaps) == 0


# A process whose heap holds 300 MB that training would reuse, put on huge pages, then grown by
# 160 MB and put on huge pages again; AnonHugePages read from the kernel's own summary each time.
HEAP = """
import json, re, torch
from nlpwf.runtime import allocator, hugepages
def huge_mb():
    return int(re.search(r"AnonHugePages:\\s+(\\d+) kB", open("/proc/self/smaps_rollup").read()).group(1)) >> 10
allocator.keep_freed_memory()
blocks = [torch.ones(25_000_000) for _ in range(3)]  # 300 MB, then freed: kept in the heap
del blocks
before = huge_mb()
state = hugepages.back_heap(hugepages.HeapPages())
first = dict(status=state.status, seconds=state.seconds, huge=huge_mb())
again = hugepages.back_heap(state).seconds  # nothing new: nothing done
kept = [torch.ones(70_000_000), torch.ones(40_000_000)]  # the first reuses the freed 300 MB, the second grows the heap
grown = hugepages.back_heap(state)
print(json.dumps(dict(before=before, first=first, again=again, second=grown.status, huge=huge_mb(), mode=hugepages.kernel_mode())))
"""


@pytest.mark.skipif(allocator.loaded_allocator() != "system" or not allocator.glibc(), reason="glibc malloc only")
def test_the_heap_goes_onto_huge_pages_where_the_kernel_allows():
    out = json.loads(subprocess.run([sys.executable, "-c", HEAP], capture_output=True, text=True, check=True).stdout)
    first = out["first"]
    if out["mode"] in (None, "never"):
        assert first["status"].startswith("off: the kernel") and out["second"] == first["status"]
        return
    if first["status"].startswith("advised only"):  # a kernel before 6.1: no synchronous collapse
        return
    held, total = (int(n) for n in re.match(r"(\d+) of (\d+) MB of the heap on huge pages$", first["status"]).groups())
    assert total >= 300 and held >= 0.9 * total, first
    assert first["huge"] - out["before"] >= 0.9 * total  # the kernel's own count moved by as much
    assert out["again"] == first["seconds"]  # the heap had not grown: no second collapse
    held2, total2 = (int(n) for n in re.match(r"(\d+) of (\d+) MB", out["second"]).groups())
    assert total2 >= total + 100 and held2 >= 0.9 * total2  # the part it grew by, collapsed too


def test_collapsing_is_done_where_the_steps_left_pay_it_back():
    assert hugepages.pays(638, 0.245, 688)     # MiniLM-L6, 3 epochs of MRPC
    assert not hugepages.pays(229, 0.02, 48)   # a tiny BERT's test run
    assert not hugepages.pays(500, 0.25, 60)   # a short run of a real model


# The training callback on a real TrainerState: a run of a million steps and one of three, each
# in a fresh process whose heap holds 300 MB, with its second step timed.
CALLBACK = """
import json, sys, torch
from transformers import TrainerState
from nlpwf.runtime import allocator
from nlpwf.training.addons import HugePages
allocator.keep_freed_memory()
blocks = [torch.ones(25_000_000) for _ in range(3)]
del blocks
pages = HugePages()
state = TrainerState(max_steps=int(sys.argv[1]))
for step in (1, 2):
    pages.on_step_begin(None, state, None)
    torch.ones(1_000_000).sum()  # the step's work
    state.global_step = step
    pages.on_step_end(None, state, None)
print(json.dumps(dict(status=pages.heap.status, seconds=pages.heap.seconds, step_s=pages.step_s)))
"""


@pytest.mark.skipif(allocator.loaded_allocator() != "system" or not allocator.glibc(), reason="glibc malloc only")
def test_the_training_callback_collapses_the_heap_of_a_long_run_only():
    runs = {steps: json.loads(subprocess.run([sys.executable, "-c", CALLBACK, str(steps)], capture_output=True, text=True,
                                             check=True).stdout) for steps in (1_000_000, 3)}
    long, short = runs[1_000_000], runs[3]
    assert long["step_s"] > 0 and short["step_s"] > 0  # timed on the second step
    if hugepages.kernel_mode() in (None, "never"):
        assert long["status"].startswith("off: ") and short["status"].startswith("off: ")
        return
    assert short["status"].startswith("skipped: 1 steps of") and short["seconds"] == 0
    if not long["status"].startswith("advised only"):
        held, total = (int(n) for n in re.match(r"(\d+) of (\d+) MB of the heap on huge pages$", long["status"]).groups())
        assert total >= 300 and held >= 0.9 * total and long["seconds"] > 0


def test_huge_pages_off_says_why():
    assert addons.huge_pages(None, {"huge_pages": False}).status == "off"
    assert addons.huge_pages(None, {"huge_pages": True, "keep_freed_memory": False}).status.startswith(
        "off: perf.keep_freed_memory=false")


def test_one_call_sets_a_process_up_and_says_what_it_got(monkeypatch):
    import torch

    from nlpwf.runtime import isa, process

    from conftest import compose

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # set_up sets it: restored for the CLI runs after this test
    before = torch.get_num_threads()
    try:
        env = process.set_up(compose("compute.threads_per_process=1", "precision=fp32", "perf.keep_freed_memory=false"))
    finally:
        torch.set_num_threads(before)
    assert (env.rank, env.local_world, env.threads, env.backend) == (Rank(), 1, 1, None)
    assert env.precision == "fp32" and env.cpus == [isa.detect().summary()]
    assert env.affinity in ("pinned", "external") and env.cores and set(env.cores) <= set(range(os.cpu_count()))
    assert env.allocator in ("system", "jemalloc", "tcmalloc")  # glibc left alone: perf.keep_freed_memory=false
    report = subprocess.run([sys.executable, "-m", "nlpwf.runtime.process"], capture_output=True, text=True, check=True).stdout
    assert "cores:" in report and "DDP backend:" in report and isa.detect().summary() in report
    old = subprocess.run([sys.executable, "-m", "nlpwf.training.cpu"], capture_output=True, text=True)
    assert old.returncode == 2  # the old entry point says where it went, in one line
    assert old.stderr.strip() == "nlpwf: error: python -m nlpwf.training.cpu has moved: run python -m nlpwf.runtime.process"


def test_unknown_comm_hook_is_refused():
    assert addons.comm_hook("bf16").__name__ == "bf16_compress_hook"
    with pytest.raises(UserError, match="perf.ddp_comm_hook=int4"):
        addons.comm_hook("int4")


# ---- one process: autocast dtype, batch shapes, same loss ----------------------------------

@pytest.fixture(scope="module")
def shape_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shapes")
    return {name: train(tmp, name, *SHAPES, *extra)[:2] for name, extra in {
        "pad128": SEED,
        "dynamic_random": ["training.train_sampling_strategy=random"],
        "dynamic_grouped": FAST,
    }.items()}


@pytest.mark.slow
@pytest.mark.parametrize("run,dtype", [("dynamic_grouped", "bfloat16"), ("pad128", "float32")])
def test_autocast_region_runs_in_the_chosen_dtype(shape_runs, run, dtype):
    metrics, job = shape_runs[run]
    assert metrics["precision"] == {"bfloat16": "bf16", "float32": "fp32"}[dtype]
    assert metrics["perf_activation_dtype"] == dtype
    assert "perf_ipex" not in metrics and "Intel Extension" not in (job / "nlpwf.log").read_text()  # retired upstream


@pytest.mark.slow
def test_seed_recipe_pads_every_batch_to_128(shape_runs):
    m = shape_runs["pad128"][0]
    assert m["perf_train_batches"] == 50
    assert m["perf_mean_padded_length"] == 128 and m["perf_overpadded_batches"] == 50
    assert m["perf_padding_fraction"] > 0.6


@pytest.mark.slow
def test_dynamic_padding_pads_each_batch_to_its_longest_pair(shape_runs):
    for name in ("dynamic_random", "dynamic_grouped"):
        m = shape_runs[name][0]
        assert m["perf_train_batches"] == 50
        assert m["perf_overpadded_batches"] == 0, name
        assert m["perf_max_padded_length"] < 128 and m["perf_mean_padded_length"] < 64


@pytest.mark.slow
def test_a_short_training_run_keeps_its_heap_on_small_pages(shape_runs):
    """50 steps of a tiny BERT would not pay back collapsing its heap: the run says so."""
    m = shape_runs["dynamic_random"][0]
    if hugepages.kernel_mode() in (None, "never") or allocator.loaded_allocator() != "system" or not allocator.glibc():
        assert m["perf_huge_pages"].startswith("off: ")
    else:
        assert re.match(r"skipped: \d+ steps of [\d.]+ s left would not pay back collapsing \d+ MB", m["perf_huge_pages"])
    assert m["perf_huge_pages_s"] == 0


@pytest.mark.slow
def test_length_grouping_makes_batches_homogeneous(shape_runs):
    grouped, shuffled = shape_runs["dynamic_grouped"][0], shape_runs["dynamic_random"][0]
    assert grouped["perf_mean_length_spread"] < 0.4 * shuffled["perf_mean_length_spread"]
    assert grouped["perf_padding_fraction"] < 0.5 * shuffled["perf_padding_fraction"]


@pytest.fixture(scope="module")
def loss_runs(tmp_path_factory):
    """The same tiny run three ways: the seed's pad-to-128 fp32, dynamic padding fp32, and
    dynamic padding bf16. Same sampler and no dropout (its masks depend on the padded shape),
    so only padding and precision differ."""
    args = [*TINY, "training.train_sampling_strategy=random", "training.learning_rate=1e-3",
            "+model.config.hidden_dropout_prob=0", "+model.config.attention_probs_dropout_prob=0"]
    runs = {"seed": ["dataset.pad_to_max_length=true", "precision=fp32"],
            "dynamic_fp32": ["dataset.pad_to_max_length=false", "precision=fp32"],
            "fast": ["dataset.pad_to_max_length=false", "precision=bf16"]}
    return {name: losses(train(tmp_path_factory.mktemp(name), name, *args, *extra)[1]) for name, extra in runs.items()}


@pytest.mark.slow
def test_dynamic_padding_gives_the_same_losses_as_padding_to_128(loss_runs):
    """Padding is masked out: per-step losses agree to float rounding."""
    a, b = loss_runs["seed"], loss_runs["dynamic_fp32"]
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3


@pytest.mark.slow
def test_fast_and_seed_recipes_reach_the_same_loss(loss_runs):
    """bf16 autocast with dynamic padding follows the seed's fp32 pad-to-128 losses within 0.02
    per step (bf16 keeps 8 mantissa bits; the weights and optimizer stay fp32), and the loss moves."""
    seed, fast = loss_runs["seed"], loss_runs["fast"]
    assert max(abs(x - y) for x, y in zip(seed, fast)) < 0.02
    assert abs(seed[-1] - fast[-1]) < 0.02
    assert len(set(round(x, 4) for x in fast)) > 1  # a real trajectory, not a constant


# ---- two processes: threads, affinity, comm hook, no all-reduce while accumulating --------

@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    common = [*TINY, "perf.ddp_comm_hook=bf16", "training.per_device_train_batch_size=8"]  # 4 batches per rank
    return {ga: train(tmp, f"ga{ga}", *common, "compute.processes_per_node=2", f"+training.gradient_accumulation_steps={ga}")
            for ga in (1, 2)}


@pytest.mark.slow
def test_workers_get_their_share_of_threads_and_disjoint_cores(ddp_runs):
    metrics, _, _ = ddp_runs[1]
    procs = metrics["perf_processes"]
    expected = threads.threads_per_process(None, 2)
    assert len(procs) == 2
    for p in procs:
        assert p["torch_threads"] == expected and p["omp_num_threads"] == str(expected)
    if all(p["affinity"] == "pinned" for p in procs):
        a, b = (set(p["cores"]) for p in procs)
        assert a and b and not a & b


@pytest.mark.slow
def test_bf16_gradient_compression_hook_is_registered(ddp_runs):
    metrics, _, _ = ddp_runs[1]
    assert metrics["perf_ddp_comm_hook"] == "bf16" and metrics["perf_ddp_comm_hook_calls"] > 0
    digests = metrics["parameter_digests"]
    assert digests[0] == digests[1]  # compressed gradients, still identical replicas


@pytest.mark.slow
def test_gradient_accumulation_skips_the_allreduce(ddp_runs):
    """Trainer runs non-final micro-batches under accelerate's no_sync: with 2 accumulation steps
    the hook (one call per bucket per all-reduce) runs once per optimizer step, not per batch."""
    per_step = {}
    for ga, (metrics, job, _) in ddp_runs.items():
        steps = metrics["perf_train_batches"] // ga
        assert metrics["perf_ddp_comm_hook_calls"] % steps == 0
        per_step[ga] = metrics["perf_ddp_comm_hook_calls"] // steps
    assert per_step[1] == per_step[2] >= 1


# ---- SIGTERM agreement: not a collective every step -----------------------------------------

def _drive_sigterm(monkeypatch, max_steps: int, signal_at: int | None, step_s: float = 0.1):
    """StopOnSigterm as in a distributed job whose all-reduce is faked (every rank agrees with
    this one), on a fake clock; returns the steps at which it communicated, and the callback."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    from nlpwf.training import sigterm

    reduced = []
    monkeypatch.setattr(sigterm, "_distributed", lambda: True)
    monkeypatch.setattr(sigterm.dist, "all_reduce", lambda t, op=None: reduced.append(int(t[0])))
    clock = [0.0]
    monkeypatch.setattr(sigterm.time, "monotonic", lambda: clock[0])
    cb, state, control = sigterm.StopOnSigterm(check_s=2.0), SimpleNamespace(global_step=0, max_steps=max_steps), TrainerControl()
    cb.on_train_begin(None, state, control)
    checked = []
    try:
        for step in range(1, max_steps + 1):
            clock[0] += step_s
            state.global_step = step
            before = len(reduced)
            cb.on_step_end(None, state, control)
            if len(reduced) > before:
                checked.append(step)
            if step == signal_at:
                cb.requested = True
            if control.should_training_stop:
                break
    finally:
        cb.on_train_end(None, state, control)
    return checked, cb, control


def test_ranks_agree_on_sigterm_every_few_seconds_not_every_step(monkeypatch):
    checked, cb, control = _drive_sigterm(monkeypatch, max_steps=100, signal_at=50)
    assert checked == [1, 21, 41, 61]  # the first step, then every 2 s of 0.1 s steps
    assert cb.stopped_at == 61 and control.should_save and control.should_training_stop


def test_the_last_step_is_always_agreed_on(monkeypatch):
    checked, cb, _ = _drive_sigterm(monkeypatch, max_steps=30, signal_at=25)
    assert checked == [1, 21, 30] and cb.stopped_at == 30
