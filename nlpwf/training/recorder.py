"""What a training run actually did, for metrics.json's perf_* keys: the activation dtype inside
autocast, the padded batch shapes, and each rank's threads and cores. It only observes: what
changes training is addons.py."""
from __future__ import annotations

import os

import torch
from transformers import TrainerCallback

from nlpwf.runtime import collective
from nlpwf.runtime.process import ProcessEnv


class Recorder(TrainerCallback):
    """Records what training ran: the dtype of the first Linear output, every batch's shape, and
    each rank's threads and cores at the end."""

    def __init__(self, trainer, env: ProcessEnv):
        self.trainer, self.env = trainer, env
        self.activation_dtype: str | None = None
        self.batches: list[tuple[int, int, int, int, int, int]] = []  # batch, padded, max, min, sum len, sum len²
        self.ranks: list[dict] | None = None
        self._handles = []

    def on_train_begin(self, args, state, control, **kwargs):
        # A Python hook inside a compiled region would break its graph on every step: the dtype
        # is recorded in eager runs only (batch shapes come from on_train_batch either way).
        # On every Linear, because whichever runs first is model-dependent (the unpadded BERT
        # computes Q, K and V from their weights without calling their modules); the first call
        # records and removes them all.
        if not self._handles and not args.torch_compile:
            self._handles = [m.register_forward_hook(self._record_dtype) for m in self.trainer.model.modules()
                             if isinstance(m, torch.nn.Linear)]

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
                                        "affinity": self.env.affinity, "allocator": self.env.allocator})

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
            "perf_allocator": self.env.allocator, "perf_processes": self.ranks,
        }


def mask_shape(mask) -> tuple[int, int, int, int, int, int]:
    """(batch, padded length, longest, shortest, sum of lengths, sum of squared lengths) of a
    batch, from its attention mask. Squared lengths give the attention FLOPs."""
    lengths = mask.sum(dim=1)
    return (mask.shape[0], mask.shape[1], int(lengths.max()), int(lengths.min()),
            int(lengths.sum()), int((lengths * lengths).sum()))


def attach(trainer, env: ProcessEnv) -> Recorder:
    """Record what `trainer` does in this process (`env`: its set-up, runtime.process)."""
    recorder = Recorder(trainer, env)
    trainer.add_callback(recorder)
    return recorder
