"""Inside one variant's process: train through nlpwf's real training path (or transformers' Trainer
alone), yielding the CPU to the other variants every few seconds of its own time and recording
when each step ended, each batch's shape, each loss and each evaluation. scheduler.py is the
other side of the pipe."""
from __future__ import annotations

import time
import traceback
from pathlib import Path

from nlpwf.runtime import isa


def make_turns_callback(conn, turn_s: float, budget_s: float, target: float | None, stop_at_target: bool, count_setup: bool):
    from transformers import TrainerCallback

    from nlpwf.training import recorder

    class Turns(TrainerCallback):
        """Yields the CPU every `turn_s` seconds of own time; records step ends and evals."""

        def __init__(self):
            self.own = 0.0
            self.resumed = time.perf_counter()
            self.steps: list[float] = []   # own time at each step end
            self.batches: list = []
            self.evals: list[dict] = []
            self.turn_own: list[tuple[float, int]] = []  # (own seconds, steps) per turn
            self.eval_s = 0.0  # own time spent evaluating (an eval runs right after a step end)
            self.losses: list[float] = []  # each training forward's loss, in order

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None and not self.losses:
                model.register_forward_hook(self._record_loss)

        def _record_loss(self, module, inputs, output):
            loss = getattr(output, "loss", None)
            if module.training and loss is not None:
                self.losses.append(float(loss.detach()))

        def clock(self) -> float:
            return self.own + time.perf_counter() - self.resumed

        def yield_turn(self) -> str:
            self.own = self.clock()
            conn.send(("yield",))
            reply = conn.recv()
            self.resumed = time.perf_counter()
            return reply

        def on_train_batch(self, inputs):  # nlpwf's trainer shows each training batch to its callbacks
            if inputs.get("attention_mask") is not None:
                self.batches.append(recorder.mask_shape(inputs["attention_mask"]))

        def on_step_end(self, args, state, control, **kwargs):
            now = self.clock()
            self.steps.append(now)
            turn_start = self.turn_own[-1][0] if self.turn_own else 0.0
            if now - (0.0 if count_setup else self.steps[0]) >= budget_s:
                control.should_training_stop = True
            elif now - turn_start >= turn_s:
                self.turn_own.append((now, len(self.steps)))
                if self.yield_turn() == "stop":
                    control.should_training_stop = True

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            acc, now = metrics.get("eval_accuracy"), self.clock()
            self.eval_s += now - (self.steps[-1] if self.steps else now)
            self.evals.append({"own_s": now, "train_own_s": now - self.eval_s, "epoch": state.epoch, "step": state.global_step,
                               "accuracy": acc, "f1": metrics.get("eval_f1")})
            if stop_at_target and target is not None and acc is not None and acc >= target:
                control.should_training_stop = True

    return Turns()


def train_plain(cfg, job_dir: Path, turns, attention: str) -> dict:
    """transformers' Trainer alone: the data, model, seed and TrainingArguments nlpwf would use
    (so the same batches in the same order, the same flags and maths), dynamic padding by
    DataCollatorWithPadding, the model in `attention` (sdpa or eager), and none of nlpwf's
    add-ons (no unpadding, pinning, allocator, recorder, checkpoint or SIGTERM callbacks). Only
    the benchmark's own observer is added."""
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    from nlpwf import models
    from nlpwf.data.splits import load_splits
    from nlpwf.data.tokenize import tokenize
    from nlpwf.training.trainer import training_arguments

    task, splits = load_splits(cfg.dataset)
    tokenizer = models.load_tokenizer(cfg.model)
    encoded = tokenize(splits, tokenizer, cfg.dataset.max_seq_length, cfg.dataset.pad_to_max_length)
    args = training_arguments(cfg, job_dir, [], isa.resolve(cfg.precision.name, announce=False))
    set_seed(args.seed)
    model = models.load_model(cfg.model, **task.model_config())
    model.set_attn_implementation(attention)

    class Observed(Trainer):
        def training_step(self, model, inputs, *a, **kw):
            turns.on_train_batch(inputs)
            return super().training_step(model, inputs, *a, **kw)

    trainer = Observed(model=model, args=args, train_dataset=encoded["train"], eval_dataset=encoded["eval"],
                       processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer), callbacks=[turns])
    metrics = trainer.train().metrics
    return {**metrics, "perf_allocator": "system (stock)", "perf_activation_dtype": None, "perf_unpad": f"off (stock, {attention})"}


def worker(conn, overrides: list[str], job_dir: str, turn_s: float, budget_s: float, target, stop_at_target: bool,
           count_setup: bool, plain: str | None = None) -> None:
    """One variant: import, wait for the first turn, then train through nlpwf.stages.train.train
    (or, with `plain` an attention implementation, through transformers' Trainer alone)."""
    try:
        import logging

        from hydra import compose, initialize_config_dir

        from nlpwf import CONF_DIR
        from nlpwf.stages import train

        logging.basicConfig(level=logging.WARNING)
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        turns = make_turns_callback(conn, turn_s, budget_s, target, stop_at_target, count_setup)
        conn.send(("ready",))
        conn.recv()
        turns.resumed = time.perf_counter()  # own time starts with the first turn: setup counts
        if plain:
            result = train_plain(cfg, Path(job_dir), turns, plain)
        else:
            result = train.train(cfg, Path(job_dir), callbacks=[turns])
        conn.send(("done", {
            "own_s": turns.clock(), "steps": turns.steps, "batches": turns.batches, "evals": turns.evals,
            "turns": turns.turn_own, "allocator": result.get("perf_allocator"), "epoch": result.get("epoch"),
            "eval_accuracy": result.get("eval_accuracy"), "activation_dtype": result.get("perf_activation_dtype"),
            "eval_s": turns.eval_s, "losses": turns.losses, "unpad": result.get("perf_unpad"),
        }))
    except Exception:
        conn.send(("error", traceback.format_exc()))
