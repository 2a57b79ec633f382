"""Training progress as plain log lines when stderr is not a terminal (see console.py).

LineProgress replaces Trainer's tqdm bar: one line per logging step, and one at each tenth of
the steps or every `interval_s` seconds, whichever comes first, with the time left.
"""
from __future__ import annotations

import logging
import time

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from nlpwf.runtime.console import interactive

log = logging.getLogger("nlpwf.progress")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class LineProgress(TrainerCallback):
    """Trainer progress as log lines (rank 0)."""

    def __init__(self, interval_s: float = 60.0, fraction: float = 0.1) -> None:
        self.interval_s, self.fraction = interval_s, fraction
        self.start = self.last_line = 0.0
        self.next_mark = 0.0
        self.first_step = 0
        self.eval_started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_line = time.monotonic()
        self.first_step = state.global_step  # a resumed run starts part-way
        self.next_mark = state.global_step / max(1, state.max_steps) + self.fraction
        if state.is_world_process_zero:
            log.info("train: %d steps%s", state.max_steps,
                     f", resuming at step {state.global_step}" if state.global_step else "")

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        done = state.global_step / max(1, state.max_steps)
        now = time.monotonic()
        if done + 1e-9 >= self.next_mark or now - self.last_line >= self.interval_s:
            while self.next_mark <= done + 1e-9:
                self.next_mark += self.fraction
            self._line(state, now)

    def _line(self, state, now: float) -> None:
        elapsed = now - self.start
        steps = state.global_step - self.first_step
        left = elapsed / steps * (state.max_steps - state.global_step) if steps else 0.0
        log.info("train: step %d/%d (%d%%), %s elapsed, about %s left", state.global_step, state.max_steps,
                 100 * state.global_step // max(1, state.max_steps), _duration(elapsed), _duration(left))
        self.last_line = now

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            shown = ", ".join(f"{k} {_fmt(v)}" for k, v in logs.items() if k != "total_flos")
            log.info("step %d/%d: %s", state.global_step, state.max_steps, shown)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        now = time.monotonic()
        if state.is_world_process_zero and not self.eval_started:
            self.eval_started = now
            n = len(eval_dataloader) if eval_dataloader is not None and hasattr(eval_dataloader, "__len__") else "?"
            log.info("eval: %s batches", n)

    def on_evaluate(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.eval_started:
            log.info("eval: done in %s", _duration(time.monotonic() - self.eval_started))
        self.eval_started = 0.0


def install(trainer) -> None:
    """Swap Trainer's tqdm bar for LineProgress when stderr is not a terminal."""
    if interactive() or trainer.args.disable_tqdm:
        return  # a terminal keeps tqdm; disable_tqdm already prints plain log lines
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LineProgress())
