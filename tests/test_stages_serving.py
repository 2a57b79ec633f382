"""stage=evaluate and stage=predict on a tiny saved model: rows in = rows out, streaming in
bounded chunks, and bad input failing in one line with no output left looking complete."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from nlpwf.errors import UserError
from nlpwf.inference import textfiles
from nlpwf.inference.load import load_classifier
from nlpwf.stages import benchmark, evaluate, predict

from conftest import compose, pairs, run_cli, save_tiny_model, sentence_pairs, write_glue


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("serving") / "model")


def _job(tmp_path: Path, name: str = "job") -> Path:
    job = tmp_path / name
    job.mkdir()
    return job


def _write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("\t".join(rows[0]) + "\n" + "".join("\t".join(map(str, r.values())) + "\n" for r in rows))
    return path


def _rows(n: int) -> list[dict]:
    # Commas and quotes in the text: CSV must quote them and give them back unchanged.
    return [{"id": f"r{i}", "sentence1": a + ', "quoted"', "sentence2": b} for i, (a, b) in enumerate(sentence_pairs(n))]


def _read(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with path.open(newline="") as f:
        return list(csv.DictReader(f, **({"delimiter": "\t", "quoting": csv.QUOTE_NONE} if path.suffix == ".tsv" else {})))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".tsv"])
def test_predict_writes_every_input_row_in_order_with_label_and_probability(model, tmp_path, suffix):
    rows = _rows(23)
    source = _write(tmp_path / f"in{suffix}", rows)
    job = _job(tmp_path)
    cfg = compose("stage=predict", f"stage.model_path={model}", f"stage.input={source}", "stage.chunk_rows=5", "stage.batch_size=3")
    result = predict.run(cfg, job)

    out = _read(job / f"predictions{suffix}")
    assert [{k: r[k] for k in ("id", "sentence1", "sentence2")} for r in out] == rows
    # Chunked, length-sorted batches give what one pass over the whole file gives.
    whole = load_classifier(str(model), "test", max_length=128)
    labels, probs = whole.predict([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], batch_size=64)
    assert [int(r["predicted_label"]) for r in out] == labels.tolist()  # a model trained without names shows ids
    assert np.allclose([float(r["probability"]) for r in out], probs.max(axis=1), atol=1e-4)
    assert np.allclose([[float(r["probability_0"]), float(r["probability_1"])] for r in out], probs, atol=1e-4)
    assert all(0.5 <= float(r["probability"]) <= 1 for r in out)
    assert len(set(labels.tolist())) == 2  # the model's labels depend on the input
    assert result["predict_pairs"] == 23 and result["output"] == str(job / f"predictions{suffix}")
    assert json.loads((job / "metrics.json").read_text())["pairs_per_second"] > 0


def test_reader_streams_a_large_file_in_bounded_chunks(tmp_path):
    source = write_glue(tmp_path / "big.tsv", pairs(5000))
    size = source.stat().st_size
    reader = textfiles.TextReader(source, chunk_rows=10)
    chunks = reader.chunks()
    first = next(chunks)
    # After one chunk, only a read buffer's worth of a ~500 KB file has been read.
    assert len(first.rows) == 10 and reader._file.buffer.tell() < size / 10
    sizes = [len(first.rows)] + [len(c.rows) for c in chunks]
    assert max(sizes) == 10 and sum(sizes) == 5000
    reader.close()


def test_predict_glue_file_reads_glue_columns_and_keeps_its_header(model, tmp_path):
    source = write_glue(tmp_path / "dev.tsv", pairs(12))
    job = _job(tmp_path)
    predict.run(compose("stage=predict", f"stage.model_path={model}", f"stage.input={source}"), job)
    lines = (job / "predictions.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String", "predicted_label", "probability",
                                    "probability_0", "probability_1"]
    assert [line.split("\t")[:5] for line in lines[1:]] == [[str(c) for c in p] for p in pairs(12)]


def test_bad_row_midway_leaves_no_output_and_no_temp_file(model, tmp_path):
    rows = _rows(30)
    source = _write(tmp_path / "in.jsonl", rows)
    with source.open("a") as f:
        f.write('{"id": "bad", "sentence1": "only one sentence"}\n')
    job = _job(tmp_path)
    cfg = compose("stage=predict", f"stage.model_path={model}", f"stage.input={source}", "stage.chunk_rows=8")
    with pytest.raises(UserError, match=r"in.jsonl:31: no key 'sentence2'"):
        predict.run(cfg, job)
    assert sorted(p.name for p in job.iterdir()) == []  # 3 chunks were written, then removed


BAD_PREDICT_INPUT = {"not_a_model": "is not a saved model (no config.json)", "missing_columns": "has no column 'sentence1' or '#1 String'",
                     "empty_file": "is empty"}


def _bad_predict_input(model: Path, tmp_path: Path, case: str) -> tuple[Path, Path]:
    source = _write(tmp_path / "in.csv", _rows(4))
    model_path = model
    if case == "not_a_model":
        model_path = tmp_path / "job_without_model"
        model_path.mkdir()
        (model_path / "metrics.json").write_text("{}")
    elif case == "missing_columns":
        _write(source, [{"id": "1", "text": "a", "other": "b"}])
    else:
        source.write_text("")
    return model_path, source


@pytest.mark.parametrize("case", list(BAD_PREDICT_INPUT))
def test_bad_input_is_one_line_and_no_output(model, tmp_path, case):
    model_path, source = _bad_predict_input(model, tmp_path, case)
    job = _job(tmp_path)
    with pytest.raises(UserError) as e:
        predict.run(compose("stage=predict", f"stage.model_path={model_path}", f"stage.input={source}"), job)
    assert BAD_PREDICT_INPUT[case] in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 2
    assert not [p for p in job.iterdir() if "prediction" in p.name]


@pytest.mark.slow  # the CLI contract; the messages are checked in-process above
def test_bad_input_through_the_cli_is_exit_2_and_one_line(model, tmp_path):
    model_path, source = _bad_predict_input(model, tmp_path, "not_a_model")
    job = tmp_path / "job"
    proc = run_cli("stage=predict", f"stage.model_path={model_path}", f"stage.input={source}", f"hydra.run.dir={job}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nlpwf: error:")]
    assert len(errors) == 1
    assert BAD_PREDICT_INPUT["not_a_model"] in errors[0]
    assert not [p for p in job.iterdir() if "prediction" in p.name]


def test_not_a_model_dir_with_a_broken_config_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    (folder / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="does not hold a loadable (model|tokenizer)") as error:
        load_classifier(str(folder), "predict", max_length=32)
    assert "\n" not in str(error.value)


def test_evaluate_a_labelled_file_gives_accuracy_f1_and_confusion(model, tmp_path):
    source = write_glue(tmp_path / "dev.tsv", pairs(20))
    job = _job(tmp_path)
    result = evaluate.run(compose("stage=evaluate", f"stage.model_path={model}", f"stage.file={source}"), job)
    saved = json.loads((job / "metrics.json").read_text())
    (tn, fp), (fn, tp) = saved["eval_confusion_matrix"]
    assert tn + fp + fn + tp == 20 and tn + fp == 10  # pairs() alternates labels 0 / 1
    assert saved["eval_accuracy"] == pytest.approx((tn + tp) / 20)
    assert saved["eval_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    assert result["eval_pairs"] == 20


def test_evaluate_without_model_path_says_where_models_are(tmp_path):
    with pytest.raises(UserError, match=r"stage.model_path=DIR: the model/ folder of a training job"):
        evaluate.run(compose("stage=evaluate", "dataset.max_eval_samples=4"), _job(tmp_path))


@pytest.mark.slow  # times three backends
def test_benchmark_times_every_backend_at_every_batch_size_and_writes_a_table(model, tmp_path):
    job = _job(tmp_path)
    cfg = compose("stage=benchmark", f"stage.model_path={model}", "stage.backends=[fp32,bf16,torch_dynamic]",
                  "stage.batch_sizes=[1,4]", "stage.rounds=2", "stage.calls_per_round=2", "stage.warmup_calls=1",
                  "stage.calibration_samples=8", "dataset.max_train_samples=16", "dataset.max_eval_samples=12")
    result = benchmark.run(cfg, job)
    rows = {(r["backend"], r["batch_size"]): r for r in result["rows"]}
    assert set(rows) == {(b, n) for b in ("fp32", "bf16", "torch_dynamic") for n in (1, 4)}
    assert all(r["calls"] == 4 for r in rows.values())  # 2 rounds x 2 calls each
    assert rows[("fp32", 1)]["speedup_vs_fp32"] == 1.0
    # Accuracy is scored per backend on the eval split: the same 12 pairs, so a multiple of 1/12.
    assert all(abs(r["accuracy"] * 12 - round(r["accuracy"] * 12)) < 1e-3 for r in rows.values())
    table = (job / "benchmark.md").read_text()
    assert table.count("| torch_dynamic |") == 2 and "alternating" in table
    assert json.loads((job / "metrics.json").read_text())["rows"] == result["rows"]


@pytest.mark.parametrize("override, message", [
    ("stage.backends=[fp32,onnx]", "choose from fp32, bf16"), ("stage.batch_sizes=[0]", "batch sizes of 1 or more"),
    ("stage.rounds=0", "stage.rounds=0"),
])
def test_benchmark_config_mistakes_are_one_line_errors(override, message):
    with pytest.raises(UserError, match=message):
        benchmark.check(compose("stage=benchmark", override).stage)
