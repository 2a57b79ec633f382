"""What nlpwf changes in training, from the `perf` config node: training without computing the
padding (unpad.py), the heap on huge pages once training has grown it (runtime.hugepages), and an
optional DDP gradient-compression hook. What only observes training is recorder.py; the
per-process set-up (threads, cores, allocator) is runtime.process.

bf16 autocast, dynamic padding, length grouping, `torch_compile` and `ddp_bucket_cap_mb` are
plain `precision` / `dataset` / `training` settings that transformers applies itself.
"""
from __future__ import annotations

import logging
import time

import torch
from transformers import TrainerCallback

from nlpwf.errors import UserError
from nlpwf.runtime import hugepages
from nlpwf.training import unpad

log = logging.getLogger(__name__)


def comm_hook(name: str):
    """A torch DDP communication hook by name: gradients are cast for the all-reduce and back."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hooks = {"allreduce": default_hooks.allreduce_hook, "bf16": default_hooks.bf16_compress_hook,
             "fp16": default_hooks.fp16_compress_hook}
    if name not in hooks:
        raise UserError(f"perf.ddp_comm_hook={name}: use one of {', '.join(hooks)} or null")
    return hooks[name]


class CommHook(TrainerCallback):
    """Registers a DDP communication hook once Trainer has wrapped the model (at the start of
    training), and counts its calls."""

    def __init__(self, trainer, name: str):
        self.trainer = trainer
        self.name, self.hook = name, comm_hook(name)  # an unknown name is refused now, before any data loads
        self.registered = "none"
        self.calls = 0

    def on_train_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        if self.registered != "none" or not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            return  # registered already, or one process: no all-reduce to compress

        def counted(state, bucket):
            self.calls += 1  # one call per gradient bucket per all-reduce: shows when no_sync skipped it
            return self.hook(state, bucket)

        wrapped.register_comm_hook(state=None, hook=counted)
        self.registered = self.name


class HugePages(TrainerCallback):
    """Puts this process's heap on huge pages (runtime.hugepages) at the end of the second
    optimizer step of the run, when the heap holds what every later step reuses (optimizer
    moments, gradients, activations), if the steps left pay back the collapse (timed on that
    step: the first one's time includes warm-up). At each log after that, the same for what the
    heap gained since (an evaluation's batches, a longer batch): a log is every `logging_steps`
    and after each evaluation."""

    def __init__(self):
        self.heap = hugepages.HeapPages()
        self.steps = 0
        self.began = 0.0
        self.step_s: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        if self.steps == 2:
            self.step_s = time.perf_counter() - self.began
            hugepages.back_heap(self.heap, self.step_s, state.max_steps - state.global_step)
            log.info("perf.huge_pages: %s (%.1f s)", self.heap.status, self.heap.seconds)

    def on_log(self, args, state, control, **kwargs):
        if self.step_s is not None:
            hugepages.back_heap(self.heap, self.step_s, state.max_steps - state.global_step)


class AddOns:
    """The add-ons put on one Trainer, and what became of them, for metrics.json."""

    def __init__(self, trainer, unpadded: str, hook: CommHook | None, heap: hugepages.HeapPages):
        self.trainer, self.unpadded, self.hook, self.heap = trainer, unpadded, hook, heap

    def report(self) -> dict:
        return {"perf_unpad": self.unpadded, **unpad.counts(self.trainer.model),
                "perf_huge_pages": self.heap.status, "perf_huge_pages_s": round(self.heap.seconds, 2),
                "perf_ddp_comm_hook": self.hook.registered if self.hook else "none",
                "perf_ddp_comm_hook_calls": self.hook.calls if self.hook else 0}


def attach(trainer, perf) -> AddOns:
    """Put nlpwf's add-ons on a Trainer before `train()`. `perf` is the `perf` node (may be None)."""
    perf = perf or {}
    hook = CommHook(trainer, perf["ddp_comm_hook"]) if perf.get("ddp_comm_hook") else None
    if hook is not None:
        trainer.add_callback(hook)
    unpadded = apply_unpad(trainer) if perf.get("unpad", False) else "off"
    return AddOns(trainer, unpadded, hook, huge_pages(trainer, perf))


def huge_pages(trainer, perf) -> hugepages.HeapPages:
    """Put the callback that moves the heap onto huge pages on `trainer`, unless `perf` rules it
    out; returns the heap's state, which says what became of it (for metrics.json)."""
    if not perf.get("huge_pages", False):
        return hugepages.HeapPages(status="off")
    if perf.get("keep_freed_memory", True) is False:
        # glibc then maps each large tensor afresh every step, outside the heap
        return hugepages.HeapPages(status="off: perf.keep_freed_memory=false puts large tensors outside the heap")
    pages = HugePages()
    trainer.add_callback(pages)
    return pages.heap


def apply_unpad(trainer) -> str:
    """Train without computing the padding (unpad.py) where the model allows it; else one line why."""
    reason = "torch_compile is on" if trainer.args.torch_compile else unpad.apply(trainer.model)
    if reason:
        log.info("perf.unpad: %s, so training computes the padded batches", reason)
        return f"off: {reason}"
    return "on, last layer for the pooled token only"  # unpad computes sequence classifiers only, always so
