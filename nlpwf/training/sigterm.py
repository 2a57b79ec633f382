"""SIGTERM (a scheduler, an Azure ML low-priority preemption, a time limit) ends training at the
next step end with a complete checkpoint, instead of losing every step since the last."""
from __future__ import annotations

import signal
import threading

from transformers import TrainerCallback

from nlpwf.runtime import collective


class StopOnSigterm(TrainerCallback):
    """SIGTERM (a scheduler, an Azure ML low-priority preemption, a time limit) ends training at
    the next step end with a complete checkpoint, instead of losing every step since the last.
    All ranks must stop at the same step, and a signal may reach only some of them, so in a
    distributed job they agree each step (one all-reduce of a single int). transformers' own
    `enable_jit_checkpoint` saves outside the on_save event, so its checkpoint would never be
    marked complete; this one goes through Trainer's normal save."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        self._previous = None

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():  # signal handlers live there
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def on_step_end(self, args, state, control, **kwargs):
        if collective.any_rank(self.requested):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
