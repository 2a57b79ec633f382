"""What a training run actually did, for metrics.json: activation dtype inside autocast, padded
batch shapes, threads and cores per rank; and the CPU add-ons `attach` puts on a Trainer
(training without the padding, IPEX when installed, an optional DDP gradient-compression hook)."""
from __future__ import annotations

import logging
import os

import torch
from transformers import TrainerCallback

from nlpwf.runtime import collective
from nlpwf.training import cpu, unpad

log = logging.getLogger(__name__)


class Recorder(TrainerCallback):
    """Registers the comm hook on the DDP model and records what training actually ran."""

    def __init__(self, trainer, settings: cpu.ProcessSettings, hook_name: str | None):
        self.trainer, self.settings, self.hook_name = trainer, settings, hook_name
        self.hook_calls = 0
        self.activation_dtype: str | None = None
        self.batches: list[tuple[int, int, int, int, int, int]] = []  # batch, padded, max, min, sum len, sum len²
        self.ranks: list[dict] | None = None
        self._handles = []

    def on_train_begin(self, args, state, control, **kwargs):
        model = self.trainer.model
        # A Python hook inside a compiled region would break its graph on every step: the dtype
        # is recorded in eager runs only (batch shapes come from on_train_batch either way).
        # On every Linear, because whichever runs first is model-dependent (the unpadded BERT
        # computes Q, K and V from their weights without calling their modules); the first call
        # records and removes them all.
        if not self._handles and not args.torch_compile:
            self._handles = [m.register_forward_hook(self._record_dtype) for m in model.modules()
                             if isinstance(m, torch.nn.Linear)]
        self._register_comm_hook(self.trainer.model_wrapped)

    def _register_comm_hook(self, wrapped) -> None:
        if not self.hook_name or self.settings.comm_hook != "none":
            return
        if not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            return  # one process: no all-reduce to compress
        hook = cpu.comm_hook(self.hook_name)

        def counted(state, bucket):
            self.hook_calls += 1  # one call per gradient bucket per all-reduce: shows when no_sync skipped it
            return hook(state, bucket)

        wrapped.register_comm_hook(state=None, hook=counted)
        self.settings.comm_hook = self.hook_name

    def on_train_batch(self, inputs) -> None:  # called by trainer.ObservedTrainer
        if inputs.get("attention_mask") is not None:
            self.batches.append(mask_shape(inputs["attention_mask"]))

    def _record_dtype(self, module, inputs, output):
        if module.training and self.activation_dtype is None:
            self.activation_dtype = str(output.dtype).replace("torch.", "")
            for handle in self._handles:  # once is enough: no Python hook on every later forward
                handle.remove()

    def on_train_end(self, args, state, control, **kwargs):
        # Every rank reaches this point, so the gather cannot hang.
        self.ranks = collective.gather({"local_rank": int(os.environ.get("LOCAL_RANK", 0)),
                                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                             "torch_threads": torch.get_num_threads(), "cores": sorted(os.sched_getaffinity(0)),
                             "affinity": self.settings.affinity, "allocator": self.settings.allocator})

    def report(self) -> dict:
        b = self.batches
        padded = sum(n * p for n, p, *_ in b)
        real = sum(s for *_, s, _ in b)
        return {
            "perf_activation_dtype": self.activation_dtype,
            "perf_train_batches": len(b),
            "perf_mean_padded_length": padded / max(1, sum(n for n, *_ in b)),
            "perf_max_padded_length": max((p for _, p, *_ in b), default=0),
            "perf_padding_fraction": 1 - real / padded if padded else 0.0,
            # batches padded beyond their longest pair (pad_to_max_length or pad_to_multiple_of)
            "perf_overpadded_batches": sum(1 for _, p, mx, *_ in b if p > mx),
            "perf_mean_length_spread": sum(mx - mn for _, _, mx, mn, *_ in b) / max(1, len(b)),
            "perf_unpad": self.settings.unpad, **unpad.counts(self.trainer.model),
            "perf_ipex": self.settings.ipex, "perf_allocator": self.settings.allocator,
            "perf_ddp_comm_hook": self.settings.comm_hook, "perf_ddp_comm_hook_calls": self.hook_calls,
            "perf_processes": self.ranks,
        }


def mask_shape(mask) -> tuple[int, int, int, int, int, int]:
    """(batch, padded length, longest, shortest, sum of lengths, sum of squared lengths) of a
    batch, from its attention mask. Squared lengths give the attention FLOPs."""
    lengths = mask.sum(dim=1)
    return (mask.shape[0], mask.shape[1], int(lengths.max()), int(lengths.min()),
            int(lengths.sum()), int((lengths * lengths).sum()))


def attach(trainer, cfg, settings: cpu.ProcessSettings, bf16: bool) -> Recorder:
    """Add nlpwf's CPU add-ons to a Trainer before `train()`. `cfg` is the `perf` node (may be None)."""
    cfg = cfg or {}
    if cfg.get("ipex", True):
        settings.ipex = cpu.apply_ipex(trainer, bf16)
    # after IPEX: its prepacked linear layers are not plain Linear weights to multiply by, so unpad says no
    settings.unpad = apply_unpad(trainer) if cfg.get("unpad", False) else "off"
    recorder = Recorder(trainer, settings, cfg.get("ddp_comm_hook"))
    if recorder.hook_name:
        cpu.comm_hook(recorder.hook_name)  # reject an unknown name now, not after loading data on every rank
    trainer.add_callback(recorder)
    return recorder


def apply_unpad(trainer) -> str:
    """Train without computing the padding (unpad.py) where the model allows it; else one line why."""
    reason = "torch_compile is on" if trainer.args.torch_compile else unpad.apply(trainer.model)
    if reason:
        log.info("perf.unpad: %s, so training computes the padded batches", reason)
        return f"off: {reason}"
    return "on, last layer for the pooled token only"  # unpad computes sequence classifiers only, always so
