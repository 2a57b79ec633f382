"""What the serving stages (evaluate, predict, quantize, benchmark) share."""
from __future__ import annotations

from omegaconf import DictConfig

from nlpwf.runtime import threads


def serving_threads(cfg: DictConfig) -> int:
    """One process on the node: all its cores, unless compute.threads_per_process says otherwise."""
    return threads.set_threads(threads.threads_per_process(cfg.compute.threads_per_process, 1))


def configured_columns(stage: DictConfig) -> list[str] | None:
    """The text columns a file's stage names: stage.text_columns, or the older
    stage.sentence1_column / sentence2_column of pair models (either may be left to detection, as
    None); None to find them all from the model."""
    if stage.get("text_columns"):
        columns = stage.text_columns
        return [columns] if isinstance(columns, str) else list(columns)
    pair = [stage.get("sentence1_column"), stage.get("sentence2_column")]
    return pair if any(pair) else None
