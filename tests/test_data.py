"""The GLUE TSV reader on the real files' quirks, the sources, and tokenisation (GLUE's other
tasks, your own files and the task detection: tests/test_tasks.py)."""
from __future__ import annotations

import csv
import importlib.util

import pytest

from nlpwf import PROJECT_ROOT
from nlpwf.data import glue
from nlpwf.data.splits import SAMPLE_DIR, load_splits
from nlpwf.data.tokenize import tokenize
from nlpwf.errors import UserError
from nlpwf.runtime import network

from conftest import GLUE_HEADER, SHARED_MRPC, compose, pairs, write_glue

MRPC = glue.TASKS["mrpc"]


def read_glue_tsv(path) -> dict[str, list]:
    """An MRPC file as columns, read the way training reads it (line by line, each line checked)."""
    rows = list(glue.rows(MRPC, path))
    return {key: [r[key] for r in rows] for key in ("sentence1", "sentence2", "label")}


def test_bom_and_stray_quotes_are_read_verbatim(tmp_path):
    rows = [(1, 1, 2, 'He called him " the witness " .', 'Referring to " the witness " , he spoke .'),
            (0, 3, 4, '" A lone quote opens this field .', "And another line ends it \" ."),
            (1, 5, 6, "Plain first .", "Plain second .")]
    path = write_glue(tmp_path / "train.tsv", rows, bom=True)
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    out = read_glue_tsv(path)
    assert out["label"] == [1, 0, 1]
    assert out["sentence1"] == [r[3] for r in rows]
    assert out["sentence2"][1] == "And another line ends it \" ."
    # The trap this guards against: a CSV reader with default quoting mangles these rows.
    with path.open(encoding="utf-8-sig", newline="") as f:
        naive = list(csv.reader(f, delimiter="\t"))
    assert [r[3:] for r in naive[1:]] != [list(r[3:]) for r in rows]


def test_file_without_bom_reads_the_same(tmp_path):
    a = read_glue_tsv(write_glue(tmp_path / "a.tsv", pairs(5), bom=True))
    b = read_glue_tsv(write_glue(tmp_path / "b.tsv", pairs(5), bom=False))
    assert a == b and len(a["label"]) == 5


def test_wrong_column_count_names_file_and_line(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text(GLUE_HEADER + "\n1\t1\t2\tfirst\tsecond\n0\t3\t4\tonly one sentence\n", encoding="utf-8-sig")
    with pytest.raises(UserError, match=r"train\.tsv:3: expected 5 tab-separated columns, found 4"):
        read_glue_tsv(path)


@pytest.mark.parametrize("label", ["2", "-1", "yes", ""])
def test_labels_must_be_0_or_1(tmp_path, label):
    path = write_glue(tmp_path / "dev.tsv", [(1, 1, 2, "a", "b"), (label, 3, 4, "c", "d")])
    with pytest.raises(UserError, match=r"dev\.tsv:3: label .* is not 0 or 1"):
        read_glue_tsv(path)


def test_empty_file_and_header_only_are_errors(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="is empty"):
        read_glue_tsv(empty)
    with pytest.raises(UserError, match="has no rows"):
        read_glue_tsv(write_glue(tmp_path / "header.tsv", []))


def test_glue_unlabelled_test_file_is_refused_with_advice(tmp_path):
    path = write_glue(tmp_path / "test.tsv", [(0, 1, 2, "a", "b")], header="index\t#1 ID\t#2 ID\t#1 String\t#2 String")
    with pytest.raises(UserError, match="no column 'Quality'.*unlabelled.*eval_split=validation"):
        read_glue_tsv(path)


# ---- one reader of delimited text: training files, GLUE folders and the serving stages' inputs ----

def _files_cfg(train, dev):
    return compose("dataset=files", f"dataset.train_file={train}", f"dataset.eval_file={dev}", "dataset.text_columns=[text]").dataset


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_training_and_predict_read_a_file_alike(tmp_path, suffix):
    """The same CSV or TSV gives the same texts to training (dataset=files) and to the serving
    stages' chunked reader: quoted commas and newlines in CSV, stray quotes in TSV, a BOM."""
    from nlpwf.inference.textfiles import TextReader

    texts = ['a "quoted" word, then a comma', "two\nlines" if suffix == ".csv" else 'a lone " quote', "plain"]
    path = tmp_path / f"train{suffix}"
    with path.open("w", encoding="utf-8-sig", newline="") as f:
        if suffix == ".csv":
            csv.writer(f).writerows([["text", "label"], *[[t, i % 2] for i, t in enumerate(texts)]])
        else:
            f.write("text\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(texts)))
    _, splits = load_splits(_files_cfg(path, path))
    with TextReader(path, [["text"]], chunk_rows=2) as reader:
        served = [text for chunk in reader.chunks() for text in chunk.texts[0]]
    assert splits["train"]["sentence1"] == served == texts


def test_a_row_with_the_wrong_field_count_names_its_line_in_training_and_serving(tmp_path):
    from nlpwf.inference.textfiles import TextReader

    path = tmp_path / "train.csv"
    path.write_text("text,label\nfine,1\nalso fine,0\none field too many,1,extra\n")
    with pytest.raises(UserError, match=r"train\.csv:4: 3 fields where the header has 2: fix that line"):
        load_splits(_files_cfg(path, path))
    with pytest.raises(UserError, match=r"train\.csv:4: 3 fields where the header has 2"):
        with TextReader(path, [["text"]]) as reader:
            list(reader.chunks())


def test_bytes_that_are_not_utf8_are_one_line_errors(tmp_path):
    from nlpwf.inference.textfiles import TextReader

    path = tmp_path / "train.tsv"
    path.write_bytes(GLUE_HEADER.encode() + b"\n1\t1\t2\tcaf\xe9\tsecond\n")
    for read in (lambda: read_glue_tsv(path), lambda: list(TextReader(path, [["#1 String"]]).chunks())):
        with pytest.raises(UserError, match=r"train\.tsv: not UTF-8 text after line \d+ .*: save the file as UTF-8") as e:
            read()
        assert "\n" not in str(e.value)


def test_folder_splits_and_limits(glue_dir):
    cfg = compose("dataset=mrpc", f"dataset.data_dir={glue_dir}", "dataset.max_train_samples=10").dataset
    task, splits = load_splits(cfg)
    assert len(splits["train"]) == 10 and len(splits["eval"]) == 16
    assert set(splits["train"].column_names) == {"sentence1", "sentence2", "label"}
    assert task.labels == ("not_equivalent", "equivalent") and splits["train"].features["label"].names == list(task.labels)
    assert splits["train"].cache_files  # memory-mapped from datasets' Arrow cache, not held in Python


def test_missing_dev_file_and_bad_data_dir(glue_dir, tmp_path):
    (glue_dir / "dev.tsv").unlink()
    with pytest.raises(UserError, match=r"dev\.tsv not found"):
        load_splits(compose("dataset=mrpc", f"dataset.data_dir={glue_dir}").dataset)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        load_splits(compose("dataset=mrpc", f"dataset.data_dir={a_file}").dataset)


def test_hub_offline_fails_fast_with_advice(monkeypatch):
    import time

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    network.hub_reachable.cache_clear()
    start = time.monotonic()
    with pytest.raises(UserError, match="set dataset.data_dir=DIR .* or use dataset=paraphrase_sample"):
        load_splits(compose("dataset=mrpc").dataset)
    assert time.monotonic() - start < 10


def test_shipped_samples_are_what_the_generator_writes(tmp_path):
    # The generator is a script of the repository (tools/), not part of the installed package.
    spec = importlib.util.spec_from_file_location("make_samples", PROJECT_ROOT / "tools" / "make_samples.py")
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    sample.main(tmp_path / "paraphrase", topic_dir=tmp_path / "topic")
    for name in ("train.tsv", "dev.tsv"):
        assert (tmp_path / "paraphrase" / name).read_bytes() == (SAMPLE_DIR / "paraphrase_sample" / name).read_bytes()
    for name in ("train.csv", "dev.csv"):
        assert (tmp_path / "topic" / name).read_bytes() == (SAMPLE_DIR / "topic_sample" / name).read_bytes()


def test_shipped_sample_is_balanced_and_pairs_differ():
    _, splits = load_splits(compose().dataset)
    assert (len(splits["train"]), len(splits["eval"])) == (800, 200)
    for split in splits.values():
        positive = sum(split["label"]) / len(split)
        assert 0.4 < positive < 0.6
        assert all(a != b for a, b in zip(split["sentence1"], split["sentence2"]))


@pytest.mark.skipif(not SHARED_MRPC.is_dir(), reason="needs ../shared/data/mrpc")
def test_real_mrpc_files():
    train = read_glue_tsv(SHARED_MRPC / "train.tsv")
    dev = read_glue_tsv(SHARED_MRPC / "dev.tsv")
    assert (len(train["label"]), len(dev["label"])) == (3667, 408)
    raw = (SHARED_MRPC / "train.tsv").read_text(encoding="utf-8-sig").splitlines()[1:]
    assert sum(train["label"]) == sum(line.startswith("1\t") for line in raw)
    assert any('"' in s for s in train["sentence1"])
    assert not train["sentence1"][0].startswith("\ufeff")


def test_dynamic_padding_pads_each_batch_to_its_longest(glue_dir):
    from transformers import DataCollatorWithPadding

    from nlpwf import models

    cfg = compose("dataset=mrpc", f"dataset.data_dir={glue_dir}")
    tok = models.load_tokenizer(cfg.model)
    dynamic = tokenize(load_splits(cfg.dataset)[1], tok, 128, pad_to_max_length=False)
    fixed = tokenize(load_splits(cfg.dataset)[1], tok, 128, pad_to_max_length=True)
    lengths = {len(x) for x in dynamic["train"]["input_ids"]}
    assert max(lengths) < 128 and all(len(x) == 128 for x in fixed["train"]["input_ids"])
    batch = DataCollatorWithPadding(tok)([dynamic["train"][i] for i in range(8)])
    assert batch["input_ids"].shape[1] == max(len(dynamic["train"][i]["input_ids"]) for i in range(8))
    assert "labels" in batch
