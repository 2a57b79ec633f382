"""SIGTERM (a scheduler, an Azure ML low-priority preemption, a time limit) ends training at a
step end soon after, with a complete checkpoint, instead of losing every step since the last."""
from __future__ import annotations

import signal
import threading
import time

import torch
import torch.distributed as dist
from transformers import TrainerCallback

CHECK_S = 2.0      # in a distributed job, the ranks agree about this often (seconds of training)
MAX_INTERVAL = 500  # and at least every this many steps


class StopOnSigterm(TrainerCallback):
    """SIGTERM ends training at a step end with a complete checkpoint. All ranks must stop at the
    same step, and a signal may reach only some of them, so in a distributed job they agree with
    one all-reduce, not at every step but at agreed steps about every `check_s` seconds: each
    rank proposes the next interval in steps from its own step time, and the same all-reduce
    that carries the flags picks the shortest. Every rank therefore checks at the same steps
    (and at the last), and a stop comes within about `check_s` seconds of the signal. A single
    process checks its own flag at every step end, at no cost. transformers' own
    `enable_jit_checkpoint` saves outside the on_save event, so its checkpoint would never be
    marked complete; this one goes through Trainer's normal save."""

    def __init__(self, check_s: float = CHECK_S) -> None:
        self.check_s = check_s
        self.requested = False
        self.stopped_at: int | None = None
        self.checks = 0  # all-reduces made (distributed jobs)
        self._previous = None
        self._next_check = 0
        self._last = (0, 0.0)  # (step, time) of the last check

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():  # signal handlers live there
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        self._next_check = state.global_step + 1  # a resumed run starts part-way
        self._last = (state.global_step, time.monotonic())

    def on_step_end(self, args, state, control, **kwargs):
        if not _distributed():
            stop = self.requested
        elif state.global_step >= self._next_check or state.global_step >= state.max_steps:
            stop = self._agree(state.global_step)
        else:
            return control
        if stop:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def _agree(self, step: int) -> bool:
        """One all-reduce (MAX) of [signal seen, -proposed interval]: any rank's signal, the shortest interval."""
        last_step, last_time = self._last
        now = time.monotonic()
        step_s = (now - last_time) / max(1, step - last_step)
        proposed = max(1, min(MAX_INTERVAL, round(self.check_s / step_s) if step_s > 0 else MAX_INTERVAL))
        t = torch.tensor([int(self.requested), -proposed], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self.checks += 1
        self._next_check = step + int(-t[1])
        self._last = (step, now)
        return bool(t[0])

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
