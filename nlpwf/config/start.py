"""StartCheck, a Hydra callback run before Hydra creates the run or sweep dir or logs any
override: a file in the way or a read-only disk (Hydra would report a traceback), and secrets
typed as overrides (Hydra would save them in the job dir and its launchers log them)."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from nlpwf.errors import UserError


def output_dir_problem(path: str | Path) -> str | None:
    """Why nlpwf could not write a job into `path`, or None. Looks at the nearest part that exists."""
    target = Path(path).expanduser().absolute()
    for existing in (target, *target.parents):
        if not existing.exists():
            continue
        if not existing.is_dir():
            return f"{existing} is a file, not a directory"
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"{existing} is not writable (read-only file system or no permission)"
        return None
    return None


# Keys whose values are credentials: ...password, ...secret, ...api_key, ...hub_token. Not
# pad_token_id or tokenizer: "token" counts only alone or after a word that makes it a credential.
_SECRET_KEY = re.compile(r"(^|_)(password|passwd|secret|credentials?|api_?key|access_?key|account_?key|connection_?string)$"
                         r"|(^|_)(hub|auth|access|api|bearer|sas|refresh)_token$|^token$")


def secret_override(overrides) -> str | None:
    """The key of the first override that sets a credential, or None."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if _SECRET_KEY.search(key.rsplit(".", 1)[-1].lower()):
            return key
    return None


class StartCheck(Callback):
    """Hydra callback, run before Hydra creates the run or sweep dir or logs any override."""

    def _fail(self, message: str) -> None:
        print(f"nlpwf: error: {message}", file=sys.stderr, flush=True)
        sys.exit(UserError.exit_code)

    def _check(self, key: str, config: DictConfig) -> None:
        secret = secret_override(config.hydra.overrides.task)
        if secret:
            # Overrides are saved in the job dir, logged by launchers, sent as Azure ML job tags
            # and tracking-run tags: a credential must come from the environment instead.
            self._fail(f"{secret} looks like a credential, and command-line overrides are saved, logged and sent "
                       f"as job tags: remove it and set it in the environment (e.g. HF_TOKEN, WANDB_API_KEY)")
        path = OmegaConf.select(config, key)
        problem = output_dir_problem(str(path))
        if problem:
            self._fail(f"{key}={path}: {problem}: set {key} to a writable folder")

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check("hydra.run.dir", config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check("hydra.sweep.dir", config)
