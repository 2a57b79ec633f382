"""INT8: calibration matters, the quantized model round-trips through disk, the stage gates,
`auto` picks the backend by ISA, and stage=benchmark names the fastest INT8 backend it measured.

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
from nlpwf.runtime import isa
from nlpwf.stages import benchmark, evaluate, quantize

from conftest import compose, save_tiny_model, sentence_pairs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    # fp32 explicitly: precision=auto would score the reference in bf16 autocast on a CPU with native bf16.
    classifier = load_classifier(str(folder), "test", max_length=64, precision="fp32")
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


@pytest.mark.slow  # three INC exports
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


@pytest.mark.parametrize("backend", [pytest.param("inc_static", marks=pytest.mark.slow), "torch_dynamic"])  # an INC export: slow
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


@pytest.mark.slow  # up to five INC trials
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


# ---- INT8 by ISA --------------------------------------------------------------------------

def _cpuinfo(name: str, flags: str) -> isa.Isa:
    return isa.from_cpuinfo(f"processor\t: 0\nmodel name\t: {name}\nflags\t\t: fpu sse2 avx avx2 {flags}\n")


@pytest.mark.parametrize("name, flags, expected", [
    ("Intel Xeon Platinum 8473C (Sapphire Rapids)", "avx512f avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8", "inc_static"),
    ("Intel Xeon Platinum 8370C (Ice Lake)", "avx512f avx512bw avx512_vnni avx512_vbmi2", "inc_static"),
    ("Intel Xeon Platinum 8272CL (Cascade Lake)", "avx512f avx512_vnni", "inc_static"),
    ("AMD EPYC 9V74 (Genoa, Zen 4)", "avx512f avx512_vnni avx512_bf16", "inc_static"),
    ("Intel Core i7-12700 (Alder Lake)", "avx_vnni", "inc_static"),
    ("AMX-INT8 alone", "amx_tile amx_int8", "inc_static"),
    ("Intel Xeon Platinum 8171M (Skylake-SP)", "avx512f avx512bw avx512vl", "torch_dynamic"),
    ("AMD EPYC 7763 (Milan, Zen 3)", "", "torch_dynamic"),
])
def test_auto_picks_the_int8_backend_by_isa(name, flags, expected):
    cpu = _cpuinfo(name, flags)
    backend, why = int8.choose_backend(cpu)
    assert backend == expected and backend in int8.BACKENDS
    assert (backend == "inc_static") == cpu.int8_dot_product
    assert "\n" not in why and (("stage=benchmark" in why) == (backend == "torch_dynamic"))
    # The stage resolves auto the same way and says on which CPU; an explicit backend is kept.
    chosen, reason = quantize.resolve_backend(compose("stage=quantize").stage, cpu)
    assert chosen == expected and name in reason and "auto" in reason
    assert quantize.resolve_backend(compose("stage=quantize", "stage.backend=inc_dynamic").stage, cpu)[0] == "inc_dynamic"
    # Tuning is INC's: auto with tune=true is inc_static whatever the CPU.
    assert quantize.resolve_backend(compose("stage=quantize", "stage.tune=true").stage, cpu)[0] == "inc_static"


def test_auto_is_the_default_and_passes_the_config_checks():
    stage = compose("stage=quantize").stage
    assert stage.backend == "auto"
    quantize.check(stage)
    quantize.check(compose("stage=quantize", "stage.tune=true").stage)
    with pytest.raises(UserError, match="backend 'auto' is unknown"):
        int8.check_backend("auto")  # auto is the stage's to resolve: int8.quantize never sees it


def test_quantize_with_auto_records_the_backend_it_chose_and_the_isa(tmp_path):
    folder = save_tiny_model(tmp_path / "model")
    cfg = compose("stage=quantize", f"stage.model_path={folder}", "stage.calibration_samples=16", "stage.tolerance=100",
                  "dataset.max_train_samples=32", "dataset.max_eval_samples=24")
    job = tmp_path / "job"
    job.mkdir()
    quantize.run(cfg, job)

    expected, _ = int8.choose_backend(isa.detect())
    saved = json.loads((job / "metrics.json").read_text())
    assert saved["backend_requested"] == "auto" and saved["backend"] == expected
    assert int8.manifest(job / "model_int8")["backend"] == expected  # the published folder is that backend's
    assert saved["isa"] == isa.detect().as_dict() and saved["isa_summary"] == isa.detect().summary()
    assert saved["backend_reason"].startswith("stage.backend=auto on " + isa.detect().cpu)


def test_auto_takes_a_benchmark_measured_on_the_same_isa_and_only_that(tmp_path):
    genoa = _cpuinfo("AMD EPYC 9V74 (Genoa, Zen 4)", "avx512f avx512_vnni avx512_bf16")
    ice_lake = _cpuinfo("Intel Xeon Platinum 8370C (Ice Lake)", "avx512f avx512bw avx512_vnni avx512_vbmi2")
    stage = compose("stage=quantize").stage
    run = {"isa": genoa.as_dict(), "isa_summary": genoa.summary(), "recommended_int8_backend": "torch_dynamic"}
    (tmp_path / "metrics.json").write_text(json.dumps(run))
    loaded, source = quantize.read_benchmark(str(tmp_path))
    assert quantize.resolve_backend(stage, genoa, loaded, source) == (
        "torch_dynamic", f"stage.backend=auto on {genoa.summary()}: fastest INT8 backend measured by {tmp_path / 'metrics.json'}")
    # Measured on another CPU, or no INT8 backend within tolerance: the ISA rule, saying why.
    chosen, why = quantize.resolve_backend(stage, ice_lake, loaded, source)
    assert chosen == "inc_static" and "measured on another CPU" in why and genoa.summary() in why
    none = {**run, "recommended_int8_backend": None}
    assert quantize.resolve_backend(stage, genoa, none, source)[0] == "inc_static"
    # Explicit backends and tuning are not overridden by a measurement.
    assert quantize.resolve_backend(compose("stage=quantize", "stage.backend=inc_dynamic").stage, genoa, loaded, source)[0] == "inc_dynamic"
    assert quantize.resolve_backend(compose("stage=quantize", "stage.tune=true").stage, genoa, loaded, source)[0] == "inc_static"
    # A path that holds no benchmark's metrics.json is a one-line error.
    with pytest.raises(UserError, match="no readable metrics.json"):
        quantize.read_benchmark(str(tmp_path / "missing"))
    (tmp_path / "train.json").write_text(json.dumps({"eval_accuracy": 0.8}))
    with pytest.raises(UserError, match="not a stage=benchmark job's metrics.json"):
        quantize.read_benchmark(str(tmp_path / "train.json"))


def _row(backend: str, batch: int, ms: float, accuracy: float | None = None) -> dict:
    row = {"backend": backend, "batch_size": batch, "median_ms": ms, "pairs_per_second": round(1000 * batch / ms, 2)}
    return row if accuracy is None else {**row, "accuracy": accuracy}


def test_recommendation_is_the_fastest_int8_backend_within_tolerance():
    rows = [_row("fp32", 1, 20.0, 0.80), _row("fp32", 16, 250.0, 0.80),
            _row("inc_static", 1, 6.0, 0.795), _row("inc_static", 16, 60.0, 0.795),
            _row("torch_dynamic", 1, 5.0, 0.78), _row("torch_dynamic", 16, 50.0, 0.78),
            _row("inc_dynamic", 1, 7.0, 0.80), _row("inc_dynamic", 16, 300.0, 0.80)]
    # torch_dynamic is fastest but loses 2 points: with tolerance 1 it is left out, with 5 it wins.
    strict = benchmark.recommend(rows, "accuracy", 1.0)
    assert strict["recommended_int8_backend"] == "inc_static" and strict["int8_excluded"] == {"torch_dynamic": 2.0}
    assert [(b["batch_size"], b["backend"]) for b in strict["fastest_int8"]] == [(1, "inc_static"), (16, "inc_static")]
    assert benchmark.recommend(rows, "accuracy", 5.0)["recommended_int8_backend"] == "torch_dynamic"
    # Split winners: the least geometric-mean slowdown against each batch size's fastest.
    split = [_row("inc_static", 1, 10.0), _row("inc_static", 16, 100.0),
             _row("torch_dynamic", 1, 9.0), _row("torch_dynamic", 16, 150.0)]
    result = benchmark.recommend(split)
    assert [b["backend"] for b in result["fastest_int8"]] == ["torch_dynamic", "inc_static"]
    assert result["recommended_int8_backend"] == "inc_static"  # 1.11x at batch 1 beats 1.5x at 16
    assert benchmark.recommend([_row("fp32", 1, 5.0)])["recommended_int8_backend"] is None


def test_benchmark_reports_the_isa_and_the_fastest_int8_backend_it_measured(tmp_path):
    folder = save_tiny_model(tmp_path / "model")
    job = tmp_path / "job"
    job.mkdir()
    cfg = compose("stage=benchmark", f"stage.model_path={folder}", "stage.backends=[fp32,inc_static,torch_dynamic]",
                  "stage.compile=false", "stage.batch_sizes=[1,4]", "stage.rounds=2", "stage.calls_per_round=2",
                  "stage.warmup_calls=1", "stage.calibration_samples=8", "stage.accuracy=false",
                  "dataset.max_train_samples=16", "dataset.max_eval_samples=8")
    benchmark.run(cfg, job)

    saved = json.loads((job / "metrics.json").read_text())
    assert saved["isa"] == isa.detect().as_dict()
    int8_rows = [r for r in saved["rows"] if r["backend"] in int8.BACKENDS]
    assert {r["backend"] for r in int8_rows} == {"inc_static", "torch_dynamic"}
    for best in saved["fastest_int8"]:  # at each batch size, the INT8 row with the least median time
        fastest = min((r for r in int8_rows if r["batch_size"] == best["batch_size"]), key=lambda r: r["median_ms"])
        assert best["backend"] == fastest["backend"] and best["speedup_vs_fp32"] == fastest["speedup_vs_fp32"]
    assert [b["batch_size"] for b in saved["fastest_int8"]] == [1, 4]
    recommended = saved["recommended_int8_backend"]
    winners = {b["backend"] for b in saved["fastest_int8"]}
    assert recommended in winners  # a measured backend, fastest at one batch size at least
    if len(winners) == 1:
        assert recommended == winners.pop()
    table = (job / "benchmark.md").read_text()
    assert f"CPU: {isa.detect().summary()}." in table
    best = saved["fastest_int8"][0]
    assert f"Fastest INT8 backend here: {best['backend']}, {best['speedup_vs_fp32']:.2f}× fp32 at batch 1" in table
    assert f"INT8 backend to use on this machine: {recommended}" in table
    assert "inc_static ran uncompiled (stage.compile=false)" in table  # its numbers are not what it serves at

    # quantize's auto takes this measurement, given the job dir, on this machine (the same ISA).
    chosen, why = quantize.resolve_backend(compose("stage=quantize", f"stage.benchmark={job}").stage, isa.detect(),
                                           *quantize.read_benchmark(str(job)))
    assert chosen == recommended and str(job / "metrics.json") in why
