"""Console output that reads well both in a terminal and in a log file (Azure ML's logs).

In a terminal, tqdm's bars (Trainer's, datasets' map, model loading and saving) redraw in place
with carriage returns. In a log file every redraw is kept, so a bar becomes pages of `\r` noise.
When stderr is not a terminal nlpwf turns the Hugging Face bars off (env vars, so worker
processes inherit it) and training reports progress as lines (progress.LineProgress).
Also here: the resolved config as a tree, printed once at the start of a run.
Light on imports: this runs before any config error is reported.
"""
from __future__ import annotations

import logging
import os
import sys

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("nlpwf")

_SHOWN = "NLPWF_CONFIG_SHOWN"  # set once printed, so the workers of a local job do not repeat it


def interactive(stream=None) -> bool:
    stream = stream if stream is not None else sys.stderr  # tqdm draws on stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def setup() -> None:
    if interactive():
        return
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # and by transformers' own bars
    if "datasets" in sys.modules:  # already imported (e.g. several jobs in one process)
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def _show(value) -> str:
    """As it would be written on the command line: null, true, [a, b]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def config_tree(cfg: DictConfig) -> str:
    """The resolved config as an indented tree, groups before plain values."""
    data = OmegaConf.to_container(cfg, resolve=True)
    try:
        from io import StringIO

        from rich.console import Console
        from rich.tree import Tree
    except ImportError:  # rich is optional
        return OmegaConf.to_yaml(data)
    tree = Tree("config")

    def add(branch, node):
        for key, value in sorted(node.items(), key=lambda kv: (not isinstance(kv[1], dict), kv[0])):
            if isinstance(value, dict):
                add(branch.add(str(key)), value)
            else:
                branch.add(f"{key}: {_show(value)}", highlight=False)

    add(tree, data)
    buffer = StringIO()
    Console(file=buffer, width=200, color_system=None, emoji=False, markup=False).print(tree)
    return buffer.getvalue().rstrip()


def show_config(cfg: DictConfig, rank: int | None) -> None:
    """Once per run: by the process the user started, or by rank 0 of a job started elsewhere
    (Azure ML, torchrun), not again by the workers of a local job."""
    if rank is not None and (rank != 0 or os.environ.get(_SHOWN)):
        return
    log.info("config:\n%s", config_tree(cfg))
    os.environ[_SHOWN] = "1"  # inherited by the workers this process starts
