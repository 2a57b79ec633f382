"""INT8: calibration matters, the quantized model round-trips through disk, the stage gates.

On a tiny random BERT (seconds). INC's PT2E graphs are used uncompiled here: compiling
checks nothing about quantization and takes minutes on a shared 2-core machine.
"""
from __future__ import annotations

import json

import pytest
import torch

from nlpwf.errors import UserError
from nlpwf.inference import int8
from nlpwf.inference.classifier import Classifier
from nlpwf.inference.load import load_classifier, load_fp32
from nlpwf.stages import evaluate, quantize

from conftest import compose, save_tiny_model, sentence_pairs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    classifier = load_classifier(str(folder), "test", max_length=64)
    pairs = sentence_pairs(48)
    s1, s2 = [a for a, _ in pairs], [b for _, b in pairs]
    calibration = [inputs for _, inputs in classifier.batches(s1[:32], s2[:32], batch_size=8)]
    probe = sentence_pairs(24, start=100)
    return folder, classifier, calibration, ([a for a, _ in probe], [b for _, b in probe])


def _logits(forward, classifier, probe):
    return Classifier(forward, classifier.tokenizer, classifier.max_length).logits(*probe, batch_size=8)


def _correlation(a, b) -> float:
    a, b = torch.tensor(a).flatten(), torch.tensor(b).flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_inc_static_without_calibration_outputs_a_constant_and_nlpwf_refuses(tiny):
    from neural_compressor.torch.quantization import StaticQuantConfig, convert, prepare

    folder, classifier, calibration, probe = tiny
    fp32 = _logits(classifier.forward, classifier, probe)
    assert fp32.std(axis=0).min() > 0.05  # the fp32 model's logits do vary with the input

    # INC itself: prepare then convert with no calibration pass converts without complaint...
    prepared = prepare(int8.export(load_fp32(folder), calibration[0]), StaticQuantConfig())
    assert int8.uncalibrated_observers(prepared)
    uncalibrated = _logits(convert(prepared), classifier, probe)
    # ...but its observers kept their defaults (scale 1, zero point 0): every activation is
    # rounded to a whole number and negatives clipped, so the logits are integers, not fp32's.
    assert (uncalibrated == uncalibrated.round()).all() and not (fp32 == fp32.round()).all()

    # nlpwf refuses a calibration pass with no data, in one line naming the fix.
    prepared = prepare(int8.export(load_fp32(folder), calibration[0]), StaticQuantConfig())
    with pytest.raises(UserError, match="calibration_samples"):
        int8.calibrate(prepared, [])

    # Calibrated, the same backend tracks fp32 closely, far closer than the uncalibrated graph.
    calibrated = _logits(int8.quantize(load_fp32(folder), "inc_static", calibration), classifier, probe)
    assert int8.uncalibrated_observers(prepared)  # the refused pass left it untouched
    assert _correlation(calibrated, fp32) > 0.9
    assert abs(uncalibrated - fp32).mean() > 5 * abs(calibrated - fp32).mean()
    assert (calibrated.argmax(1) == fp32.argmax(1)).mean() >= 0.8


@pytest.mark.parametrize("backend", ["inc_static", "torch_dynamic"])
def test_quantized_model_saves_and_loads_back_with_identical_predictions(tiny, tmp_path, backend):
    folder, classifier, calibration, probe = tiny
    qmodel = int8.quantize(load_fp32(folder), backend, calibration)
    before = _logits(qmodel, classifier, probe)
    out = tmp_path / "model_int8"
    out.mkdir()
    int8.save(qmodel, backend, out, calibration[0], folder, classifier.tokenizer, {"calibration_samples": 32})

    assert int8.manifest(out)["backend"] == backend
    # Loaded the way the stages load a model_path: it is recognised as INT8 and scores the same.
    loaded = load_classifier(str(out), "test", max_length=64, compile=False)
    assert loaded.name == backend
    after = loaded.logits(*probe, batch_size=8)
    assert torch.equal(torch.tensor(before), torch.tensor(after))
    fp32 = _logits(classifier.forward, classifier, probe)
    assert not torch.equal(torch.tensor(after), torch.tensor(fp32))  # it is a different (INT8) model


def test_torch_dynamic_replaces_every_linear_and_keeps_accuracy_close(tiny):
    folder, classifier, _, probe = tiny
    qmodel = int8.torch_dynamic(load_fp32(folder))
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert not [m for m in qmodel.modules() if type(m) is torch.nn.Linear]
    assert sum(isinstance(m, dynamic) for m in qmodel.modules()) == sum(type(m) is torch.nn.Linear for m in classifier.forward.modules())
    assert _correlation(_logits(qmodel, classifier, probe), _logits(classifier.forward, classifier, probe)) > 0.9


def test_inc_tolerance_is_converted_from_points_to_inc_relative_loss():
    # 1 point on an 80% baseline is 1.25% relative: INC compares relative losses.
    assert int8.relative_tolerance(1.0, 0.8) == pytest.approx(0.0125)


@pytest.mark.parametrize("override, message", [
    ("stage.backend=onnx", "backend 'onnx' is unknown"),
    ("stage.calibration_samples=0", "needs a calibration pass"),
    ("stage.tolerance=-1", "tolerance=-1"),
    ("stage.tune=true stage.backend=torch_dynamic", "needs an INC backend"),
])
def test_quantize_config_mistakes_are_one_line_errors(override, message):
    cfg = compose("stage=quantize", *override.split())
    with pytest.raises(UserError, match=message) as error:
        quantize.check(cfg.stage)
    assert "\n" not in str(error.value)


def test_quantize_stage_publishes_a_model_that_evaluate_and_predict_serve(tmp_path):
    folder = save_tiny_model(tmp_path / "model")
    cfg = compose("stage=quantize", f"stage.model_path={folder}", "stage.backend=torch_dynamic",
                  "stage.calibration_samples=16", "stage.tolerance=100",
                  "dataset.max_train_samples=32", "dataset.max_eval_samples=40")
    job = tmp_path / "job"
    job.mkdir()
    result = quantize.run(cfg, job)

    assert (job / "model_int8" / int8.MANIFEST).is_file()
    assert not [p for p in job.iterdir() if p.name.startswith(".")]  # no staging dir left behind
    saved = json.loads((job / "metrics.json").read_text())
    assert saved["eval_pairs"] == 40 and saved["backend"] == "torch_dynamic"
    assert saved["accuracy_loss_points"] == pytest.approx(100 * (saved["fp32_accuracy"] - saved["eval_accuracy"]))
    assert saved["int8_size_mb"] < saved["fp32_size_mb"]

    # The published folder is a model_path like any other: evaluate reproduces the stage's score.
    ev = compose("stage=evaluate", f"stage.model_path={job / 'model_int8'}", "dataset.max_eval_samples=40")
    ev_job = tmp_path / "ev"
    ev_job.mkdir()
    assert evaluate.run(ev, ev_job)["eval_accuracy"] == result["eval_accuracy"]


def test_inc_tuning_returns_the_best_trial_and_stops_at_the_tolerance(tiny):
    folder, classifier, calibration, probe = tiny
    s1, s2 = probe
    labels = classifier.predict(s1, s2)[0].tolist()  # fp32's own labels: its accuracy is 1.0
    scored = []

    def accuracy(candidate) -> float:
        value = (Classifier(candidate, classifier.tokenizer, 64).predict(s1, s2)[0] == labels).mean()
        scored.append(float(value))
        return float(value)

    tuned = int8.inc_tune(load_fp32(folder), "inc_static", calibration, accuracy,
                          int8.relative_tolerance(5.0, 1.0), max_trials=4)
    baseline, trials = scored[0], scored[1:]
    assert baseline == 1.0 and 1 <= len(trials) <= 4  # INC scored the fp32 graph, then its INT8 trials
    # It stops at the first trial within 5 points, else returns the best of max_trials.
    assert all(t < 0.95 for t in trials[:-1])
    assert accuracy(tuned) == max(trials)
    assert int8.uncalibrated_observers(tuned) == []  # converted: no observers left, all calibrated
