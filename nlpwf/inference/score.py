"""The scoring script Azure ML's inference server runs (`azmlinfsrv --entry_script .../score.py`),
here (stage=serve) and in a managed online deployment (its code_configuration.scoring_script).

Azure's contract: the server loads this file, calls `init()` once per worker process, then
`run(raw)` per POST /score with the request body as a string; what run() returns is sent back as
JSON, an AMLResponse as it stands (its status code included). An exception in run() becomes a 500
whose body says only "an unexpected error occurred" (the traceback goes to the server's log, never
to the client), and the worker keeps serving. The model is the folder under AZUREML_MODEL_DIR
(fp32 `model/` or a quantize job's `model_int8/`, whose manifest names its INT8 backend); the
settings come from NLPWF_SERVE_* variables (inference.scoring.Settings). The contract itself
(request, answer, refusals) is inference.scoring; the model is inference.load's Classifier, as in
every other stage: nothing here knows about models.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from azureml_inference_server_http.api.aml_response import AMLResponse

# The deployment's code folder (which holds nlpwf/) is two levels above this file. Azure's server puts
# its app root (and AZUREML_SOURCE_DIRECTORY, when set) on sys.path; that need not be this folder.
CODE_ROOT = str(Path(__file__).resolve().parents[2])
if CODE_ROOT not in sys.path:
    sys.path.insert(0, CODE_ROOT)

from nlpwf.inference import scoring  # noqa: E402
from nlpwf.inference.load import load_classifier  # noqa: E402
from nlpwf.runtime import threads  # noqa: E402

# A child of the server's own logger, so that these lines go where its lines go.
log = logging.getLogger("azmlinfsrv.nlpwf")

classifier = None
settings = None


def init() -> None:
    global classifier, settings
    settings = scoring.Settings.from_env()
    n_threads = threads.set_threads(threads.threads_per_process(settings.threads, settings.workers))
    folder = scoring.find_model(os.environ.get("AZUREML_MODEL_DIR", ""))
    classifier = load_classifier(str(folder), "serve", settings.max_length, settings.precision, settings.compile)
    warm_up(classifier, settings)
    about = scoring.describe(folder)
    log.info("nlpwf model %s: %s, backend %s, %d torch threads, batch limit %d, %d tokens (%s longer ones)",
             folder, about["precision"], about["backend"], n_threads, settings.max_batch,
             settings.max_length, "refusing" if settings.too_long == scoring.REFUSE else "truncating")


def warm_up(model, config: scoring.Settings) -> None:
    """Score a few batches before the first request: an inductor-compiled INT8 graph compiles on its
    first calls (and again for batch 1, which it specialises), which would otherwise land on the
    first users' requests; the readiness probe answers only once init() has returned."""
    pairs = len(model.task.text_columns) == 2
    for n in sorted({1, 2, min(16, config.max_batch)}):
        items = [("warm-up text number %d ." % i, "its pair ." if pairs else None) for i in range(n)]
        scoring.predictions(model, items, batch_size=config.max_batch)


def run(raw: str):
    try:
        return scoring.score(classifier, raw, settings)
    except scoring.BadRequest as bad:
        log.info("refused (%d): %s", bad.status, bad)
        return AMLResponse(bad.body(), bad.status, json_str=True)
