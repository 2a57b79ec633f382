"""Any text-classification task: GLUE's nine in their own file layouts, your own files (CSV, TSV,
JSONL, Parquet), single texts and pairs, classes and scores; the metrics and objective each task
gets; bad input as one line. The end-to-end trainings (tiny random BERTs) are marked slow."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from nlpwf.data import glue
from nlpwf.data.splits import load_splits
from nlpwf.data.tasks import Task, relabel
from nlpwf.errors import UserError
from nlpwf.results import metrics, summary
from nlpwf.stages import train as train_stage
from nlpwf.training.trainer import check_objective

from conftest import assert_one_line_error, compose, pairs, run_cli

# ---- data in each task's published layout, written by the tests ------------------------------

WORDS = ["cat", "dog", "market", "shares", "river", "city", "court", "train", "storm", "garden"]


def sentence(i: int) -> str:
    return f"The {WORDS[i % 10]} near the {WORDS[(i * 3) % 10]} moved on day {i} ."


def label_of(task: glue.GlueTask, i: int):
    """Row i's label as GLUE writes it for this task: an id, a name, or a score."""
    if task.regression:
        return f"{(i * 7) % 26 / 5:.3f}"
    k = i % len(task.labels)
    return task.labels[k] if task.names_in_file else str(k)


def glue_rows(task: glue.GlueTask, n: int, start: int = 0, labelled: bool = True, mnli_dev: bool = False) -> list[str]:
    """Lines of a GLUE file of `task` (header first, except CoLA's labelled files), as GLUE lays them out."""
    lines = []
    for i in range(start, start + n):
        s1, s2, label = sentence(i), sentence(i + 5), label_of(task, i)
        if task.name == "cola":
            lines.append(f"gj04\t{label}\t{'' if label == '1' else '*'}\t{s1}" if labelled else f"{i}\t{s1}")
        elif task.name == "sst2":
            lines.append(f"{s1}\t{label}" if labelled else f"{i}\t{s1}")
        elif task.name == "mrpc":
            lines.append(f"{label}\t{100 + i}\t{200 + i}\t{s1}\t{s2}" if labelled else f"{i}\t{100 + i}\t{200 + i}\t{s1}\t{s2}")
        elif task.name == "qqp":
            lines.append(f"{i}\t{2 * i}\t{2 * i + 1}\t{s1}\t{s2}" + (f"\t{label}" if labelled else ""))
        elif task.name == "stsb":
            lines.append(f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{s1}\t{s2}" + (f"\t{label}" if labelled else ""))
        elif task.name == "mnli":
            parses = "\t".join(["( x )", "( y )", "(ROOT x)", "(ROOT y)"])
            labels = "\t".join([label] * (5 if mnli_dev else 1)) + f"\t{label}"
            lines.append(f"{i}\t{3 * i}\t{3 * i}e\tfiction\t{parses}\t{s1}\t{s2}" + (f"\t{labels}" if labelled else ""))
        else:  # qnli, rte, wnli: index, two texts, label
            lines.append(f"{i}\t{s1}\t{s2}" + (f"\t{label}" if labelled else ""))
    return [header(task, labelled, mnli_dev)] + lines if header(task, labelled, mnli_dev) else lines


def header(task: glue.GlueTask, labelled: bool = True, mnli_dev: bool = False) -> str | None:
    headers = {
        "cola": None if labelled else "index\tsentence",
        "sst2": "sentence\tlabel" if labelled else "index\tsentence",
        "mrpc": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String" if labelled else "index\t#1 ID\t#2 ID\t#1 String\t#2 String",
        "qqp": "id\tqid1\tqid2\tquestion1\tquestion2" + ("\tis_duplicate" if labelled else ""),
        "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2" + ("\tscore" if labelled else ""),
        "mnli": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                "sentence2_parse\tsentence1\tsentence2" + (("\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5" if mnli_dev else "\tlabel1")
                                                            + "\tgold_label" if labelled else ""),
        "qnli": "index\tquestion\tsentence" + ("\tlabel" if labelled else ""),
    }
    return headers.get(task.name, "index\tsentence1\tsentence2" + ("\tlabel" if labelled else ""))


def glue_folder(root: Path, name: str, n_train: int = 40, n_dev: int = 12) -> Path:
    """A folder of GLUE task `name` as GLUE distributes it: train, dev (MNLI: matched and
    mismatched) and an unlabelled test file."""
    task = glue.TASKS[name]
    folder = root / task.title
    folder.mkdir(parents=True, exist_ok=True)
    dev_files = ["dev_matched.tsv", "dev_mismatched.tsv"] if name == "mnli" else ["dev.tsv"]
    (folder / "train.tsv").write_text("\n".join(glue_rows(task, n_train)) + "\n", encoding="utf-8")
    for k, dev in enumerate(dev_files):
        (folder / dev).write_text("\n".join(glue_rows(task, n_dev, start=1000 + 100 * k, mnli_dev=True)) + "\n", encoding="utf-8")
    test = "test_matched.tsv" if name == "mnli" else "test.tsv"
    (folder / test).write_text("\n".join(glue_rows(task, 6, start=5000, labelled=False)) + "\n", encoding="utf-8")
    return folder


def write_table(path: Path, rows: list[dict]) -> Path:
    """rows as CSV, TSV, JSON Lines or Parquet, by the file's extension."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".tsv":  # as GLUE writes it: tabs, no quoting
        path.write_text("".join("\t".join(map(str, r)) + "\n" for r in [list(rows[0])] + [list(r.values()) for r in rows]))
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


REVIEWS = ["great value , works well", "broke after a day", "it is fine I guess", "best purchase this year",
           "arrived late and damaged", "does what it says"]


def reviews(n: int, start: int = 0, kind: str = "stars") -> list[dict]:
    """Single texts labelled by `kind`: stars (whole numbers 1-5), mood (names), score (floats)."""
    out = []
    for i in range(start, start + n):
        row = {"id": f"r{i}", "review": f"{REVIEWS[i % 6]} , order {i}"}
        row["label"] = {"stars": 1 + i % 5, "mood": ["bad", "good", "meh"][i % 3], "score": round((i % 11) / 2.2, 3)}[kind]
        out.append(row)
    return out


def similarity(n: int, start: int = 0) -> list[dict]:
    """Sentence pairs with a float similarity score."""
    return [{"first": sentence(i), "second": sentence(i + i % 4), "sim": round((i % 4) * 1.25 + 0.1, 2)}
            for i in range(start, start + n)]


def files_cfg(train: Path, dev: Path, *overrides: str):
    return compose("dataset=files", f"dataset.train_file={train}", f"dataset.eval_file={dev}", *overrides).dataset


# ---- GLUE's nine tasks from their folders -----------------------------------------------------

@pytest.mark.parametrize("name", list(glue.TASKS))
def test_every_glue_task_reads_its_own_layout(tmp_path, name):
    task_def = glue.TASKS[name]
    folder = glue_folder(tmp_path, name)
    task, splits = load_splits(compose(f"dataset={name}", f"dataset.data_dir={folder}").dataset)
    assert task.name == name and task.labels == task_def.labels
    assert task.text_columns == tuple(task_def.texts)  # the Hub's names, which the model records
    texts = ["sentence1", "sentence2"][:len(task_def.texts)]
    assert splits["train"].column_names == texts + ["label"]
    assert len(splits["train"]) == 40 and len(splits["eval"]) == 12
    assert splits["train"][3]["sentence1"] == sentence(3)
    if task_def.regression:
        assert splits["train"].features["label"].dtype == "float32"
        assert splits["train"][3]["label"] == pytest.approx(float(label_of(task_def, 3)))
    else:
        names = splits["train"].features["label"].names
        assert names == list(task_def.labels)
        assert names[splits["train"][3]["label"]] == task_def.labels[3 % len(task_def.labels)]
    if name == "mnli":  # matched is the eval split, mismatched is reported too
        assert set(splits) == {"train", "eval", "eval_mismatched"} and splits["eval_mismatched"][0]["sentence1"] == sentence(1100)


def test_glue_label_orders_are_the_hubs():
    assert glue.TASKS["cola"].labels == ("unacceptable", "acceptable")
    assert glue.TASKS["mnli"].labels == ("entailment", "neutral", "contradiction")
    assert glue.TASKS["rte"].labels == glue.TASKS["qnli"].labels == ("entailment", "not_entailment")
    assert glue.TASKS["wnli"].labels == ("not_entailment", "entailment")


@pytest.mark.parametrize("name, folder_of, fragment", [
    ("cola", "sst2", "laid out as GLUE's SST-2 (columns sentence, label), not as CoLA"),
    ("sst2", "cola", "laid out as GLUE's CoLA"),
    ("stsb", "mrpc", "laid out as GLUE's MRPC"),
    ("rte", "stsb", "use dataset=stsb for this folder"),
    ("qnli", "rte", "use dataset=rte or dataset=wnli"),
])
def test_a_glue_folder_of_another_task_names_the_right_one(tmp_path, name, folder_of, fragment):
    folder = glue_folder(tmp_path, folder_of)
    with pytest.raises(UserError, match=re.escape(f"train.tsv is {fragment}" if fragment.startswith("laid") else fragment)):
        load_splits(compose(f"dataset={name}", f"dataset.data_dir={folder}").dataset)


@pytest.mark.parametrize("name", ["cola", "sst2", "qqp", "stsb", "qnli", "rte"])
def test_glue_test_files_are_unlabelled_and_refused_for_evaluation(tmp_path, name):
    folder = glue_folder(tmp_path, name)
    with pytest.raises(UserError, match="unlabelled.*dataset.eval_split=validation"):
        load_splits(compose(f"dataset={name}", f"dataset.data_dir={folder}", "dataset.eval_split=test").dataset)


def test_glue_names_in_file_and_scores_are_checked_by_line(tmp_path):
    rte = glue_folder(tmp_path, "rte")
    (rte / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n")
    with pytest.raises(UserError, match=r"dev.tsv:3: label 'maybe' is not entailment or not_entailment"):
        load_splits(compose("dataset=rte", f"dataset.data_dir={rte}").dataset)
    stsb = glue_folder(tmp_path, "stsb")
    lines = (stsb / "train.tsv").read_text().splitlines()
    lines[4] = lines[4].rsplit("\t", 1)[0] + "\thigh"
    (stsb / "train.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"train.tsv:5: score 'high' is not a number"):
        load_splits(compose("dataset=stsb", f"dataset.data_dir={stsb}").dataset)


def test_a_rewritten_glue_file_is_read_again_not_served_from_the_cache(tmp_path):
    folder = glue_folder(tmp_path, "sst2")
    cfg = compose("dataset=sst2", f"dataset.data_dir={folder}").dataset
    assert len(load_splits(cfg)[1]["train"]) == 40
    (folder / "train.tsv").write_text("\n".join(glue_rows(glue.TASKS["sst2"], 30)) + "\n")
    assert len(load_splits(cfg)[1]["train"]) == 30


def fake_hub(monkeypatch, splits: dict) -> list:
    """datasets.load_dataset answering from `splits` ({(hub_id, config, split): Dataset}), as the Hub would."""
    import datasets

    from nlpwf.runtime import network

    calls = []

    def load_dataset(hub_id, config=None, split=None, **kwargs):
        calls.append((hub_id, config, split))
        return splits[(hub_id, config, split)]

    monkeypatch.setattr(network, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def hub_split(texts: dict[str, list], labels: list, names: list[str] | None):
    import datasets

    label = datasets.ClassLabel(names=names) if names else datasets.Value("float32")
    features = datasets.Features({**{k: datasets.Value("string") for k in texts}, "label": label, "idx": datasets.Value("int32")})
    return datasets.Dataset.from_dict({**texts, "label": labels, "idx": list(range(len(labels)))}, features=features)


def test_a_glue_task_from_the_hub_keeps_the_hubs_columns_and_class_names(monkeypatch):
    names = ["entailment", "neutral", "contradiction"]
    rows = {"premise": [sentence(i) for i in range(6)], "hypothesis": [sentence(i + 1) for i in range(6)]}
    calls = fake_hub(monkeypatch, {
        ("nyu-mll/glue", "mnli", "train"): hub_split(rows, [0, 1, 2, 0, 1, 2], names),
        ("nyu-mll/glue", "mnli", "validation_matched"): hub_split(rows, [2, 1, 0, 0, 1, 2], names),
        ("nyu-mll/glue", "mnli", "validation_mismatched"): hub_split(rows, [1, 1, 0, 0, 1, 2], names),
        ("nyu-mll/glue", "mnli", "test_matched"): hub_split(rows, [-1] * 6, names),
    })
    task, splits = load_splits(compose("dataset=mnli").dataset)
    assert task.labels == tuple(names) and task.text_columns == ("premise", "hypothesis")
    assert splits["eval"]["label"] == [2, 1, 0, 0, 1, 2] and splits["eval_mismatched"]["label"][0] == 1
    assert splits["train"].column_names == ["sentence1", "sentence2", "label"]
    assert ("nyu-mll/glue", "mnli", "validation_mismatched") in calls
    with pytest.raises(UserError, match="row 1 has label -1, which marks an unlabelled split"):
        load_splits(compose("dataset=mnli", "dataset.eval_split=test_matched", "dataset.extra_eval_splits={}").dataset)


def test_any_hub_dataset_with_the_same_column_keys(monkeypatch):
    texts = {"title": [f"news {i}" for i in range(8)]}
    fake_hub(monkeypatch, {("someone/news", None, "train"): hub_split(texts, [0, 1, 2, 3] * 2, ["world", "sports", "business", "tech"]),
                           ("someone/news", None, "test"): hub_split(texts, [3, 2, 1, 0] * 2, ["world", "sports", "business", "tech"])})
    task, splits = load_splits(compose("dataset=hub", "dataset.hub_id=someone/news", "dataset.text_columns=[title]",
                                       "dataset.eval_split=test").dataset)
    assert task.labels == ("world", "sports", "business", "tech")  # the dataset's own order, not sorted
    assert splits["eval"]["label"] == [3, 2, 1, 0] * 2 and task.name == "hub"


# ---- your own files ---------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_whole_number_labels_are_classes_in_numeric_order(tmp_path, suffix):
    rows = reviews(30)
    for r in rows[:3]:
        r["label"] = 10  # sorted as numbers: 1, 2, ..., 10 (not "10" before "2")
    train = write_table(tmp_path / f"train{suffix}", rows)
    dev = write_table(tmp_path / f"dev{suffix}", reviews(10, start=100))
    task, splits = load_splits(files_cfg(train, dev, "dataset.text_columns=[review]"))
    assert task.labels == ("1", "2", "3", "4", "5", "10") and not task.regression
    assert task.text_columns == ("review",) and splits["train"].column_names == ["sentence1", "label"]
    assert splits["train"][0]["label"] == 5 and splits["train"][3]["label"] == task.labels.index(str(rows[3]["label"]))
    assert splits["train"].cache_files  # memory-mapped, not Python lists


def test_string_labels_are_sorted_classes_and_eval_ids_follow_train(tmp_path):
    train = write_table(tmp_path / "train.csv", reviews(30, kind="mood"))
    dev = write_table(tmp_path / "dev.jsonl", [r for r in reviews(9, start=7, kind="mood") if r["label"] != "meh"])
    task, splits = load_splits(files_cfg(train, dev, "dataset.text_columns=review"))
    assert task.labels == ("bad", "good", "meh")
    names = splits["eval"].features["label"].names
    assert [names[i] for i in splits["eval"]["label"]] == [r["label"] for r in reviews(9, start=7, kind="mood") if r["label"] != "meh"]


def test_decimal_labels_are_a_score_and_pairs_are_found_by_name(tmp_path):
    train = write_table(tmp_path / "train.jsonl", similarity(30))
    dev = write_table(tmp_path / "dev.csv", similarity(8, start=50))
    task, splits = load_splits(files_cfg(train, dev, "dataset.text_columns=[first,second]", "dataset.label_column=sim"))
    assert task.regression and task.num_labels == 1 and task.problem_type == "regression"
    assert splits["eval"].features["label"].dtype == "float32"
    assert splits["eval"]["label"] == pytest.approx([r["sim"] for r in similarity(8, start=50)])
    assert splits["train"][1]["sentence2"] == similarity(30)[1]["second"]


def test_the_label_kind_can_be_forced(tmp_path):
    train = write_table(tmp_path / "train.csv", reviews(20))
    dev = write_table(tmp_path / "dev.csv", reviews(5, start=20))
    task, splits = load_splits(files_cfg(train, dev, "dataset.text_columns=[review]", "dataset.problem=regression"))
    assert task.regression and splits["train"][0]["label"] == 1.0
    scored = write_table(tmp_path / "scored.csv", [{"review": "x", "label": v} for v in (1.0, 2.0, 1.0, 3.0)])
    task, _ = load_splits(files_cfg(scored, scored, "dataset.text_columns=[review]", "dataset.problem=classification"))
    assert task.labels == ("1", "2", "3")


def test_default_text_columns_and_relative_files(tmp_path):
    rows = [{"sentence1": a, "sentence2": b, "label": lab} for lab, _, _, a, b in pairs(12)]
    write_table(tmp_path / "train.tsv", rows)
    write_table(tmp_path / "dev.tsv", rows[:4])
    cfg = compose("dataset=files", f"dataset.data_dir={tmp_path}", "dataset.train_file=train.tsv", "dataset.eval_file=dev.tsv")
    task, splits = load_splits(cfg.dataset)
    assert task.text_columns == ("sentence1", "sentence2") and task.labels == ("0", "1")
    assert splits["train"][0]["sentence2"] == rows[0]["sentence2"]  # TSV as GLUE: a '"' is text, not a quote


def test_texts_that_look_like_missing_values_stay_text(tmp_path):
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(["NA", "null", "None", "nan", "N/A", "fine"])]
    train = write_table(tmp_path / "train.csv", rows)
    _, splits = load_splits(files_cfg(train, train))
    assert splits["train"]["sentence1"] == ["NA", "null", "None", "nan", "N/A", "fine"]


def test_the_shipped_topic_sample_is_a_five_class_single_text_task():
    task, splits = load_splits(compose("dataset=topic_sample").dataset)
    assert task.labels == ("business", "science", "sport", "travel", "weather") and task.text_columns == ("text",)
    assert (len(splits["train"]), len(splits["eval"])) == (500, 150)
    counts = np.bincount(splits["train"]["label"], minlength=5)
    assert counts.min() > 60


@pytest.mark.slow  # writes and reads 200,000 rows
def test_a_large_file_is_memory_mapped_not_held_in_python(tmp_path):
    import tracemalloc

    n = 200_000
    path = tmp_path / "big.csv"
    with path.open("w") as f:
        f.write("text,label\n")
        for i in range(n):
            f.write(f"review number {i} of many,{['pos', 'neg', 'meh'][i % 3]}\n")
    small = write_table(tmp_path / "dev.csv", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    tracemalloc.start()
    task, splits = load_splits(files_cfg(path, small))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(splits["train"]) == n and task.labels == ("meh", "neg", "pos")
    # A Python list of the texts alone would be ~15 MB; datasets reads in chunks into Arrow.
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MB of Python objects at peak"


# ---- bad input, checked before anything is trained ---------------------------------------------

def test_bad_input_cases_name_the_problem_and_the_fix(tmp_path):
    good = write_table(tmp_path / "good.csv", reviews(12, kind="mood"))

    def fails(train, dev, *overrides, match):
        with pytest.raises(UserError, match=match) as e:
            load_splits(files_cfg(train, dev, *overrides))
        assert "\n" not in str(e.value)

    fails(good, good, "dataset.text_columns=[body]", match=r"no column 'body' \(it has 'id', 'review', 'label'\): set dataset.text_columns")
    fails(good, good, "dataset.text_columns=[review]", "dataset.label_column=stars",
          match=r"no column 'stars' \(it has 'id', 'review', 'label'\): set dataset.label_column")
    unseen = write_table(tmp_path / "unseen.csv", [{"review": "x", "label": "bad"}, {"review": "y", "label": "awful"}])
    fails(good, unseen, "dataset.text_columns=[review]", match=r"unseen.csv: row 2 has label 'awful'.*never appears in the train split")
    words = write_table(tmp_path / "words.csv", reviews(6, kind="mood"))
    fails(words, words, "dataset.text_columns=[review]", "dataset.problem=regression",
          match=r"row 1 has 'bad' in column 'label', not a number: a score for regression must be numeric")
    single = write_table(tmp_path / "single.csv", [{"review": f"r{i}", "label": "good"} for i in range(5)])
    fails(single, good, "dataset.text_columns=[review]", match=r"every row of column 'label' has the same label \(good\)")
    empty = write_table(tmp_path / "empty.csv", [{"review": "x", "label": "bad"}, {"review": "  ", "label": "good"}])
    fails(empty, good, "dataset.text_columns=[review]", match=r"row 2 has no text in column 'review'")
    xlsx = tmp_path / "train.xlsx"
    xlsx.write_bytes(b"PK")
    fails(xlsx, good, match=r"cannot read a '.xlsx' file: use a .csv, .tsv, .jsonl \(or .json\) or .parquet file")
    fails(tmp_path / "missing.csv", good, match="is not a file")
    unlabelled = write_table(tmp_path / "nolabel.csv", [{"review": "x", "label": ""}, {"review": "y", "label": "good"}])
    fails(unlabelled, good, "dataset.text_columns=[review]", match=r"row 1 has no label")


FAST = ["model=tiny_bert", "training.num_train_epochs=1", "training.disable_tqdm=true"]


# One case for each place a check runs, on the train stage's own preflight (what the CLI runs
# before any model loads): the file reader, the comparison of the splits, the GLUE folder reader
# and the task's objective. Through the CLI (a process start, seconds of imports), the first,
# for the contract: one line, exit 2, nothing written in the job dir.
BAD_INPUT = {
    "missing_column": ("has no column 'body'", "'id', 'review', 'label'"),
    "unseen_label": ("never appears in the train split",),
    "wrong_glue_folder": ("laid out as GLUE's SST-2", "use dataset=sst2"),
    "objective": ("objective=eval_accuracy is not a metric of this score (regression) task", "dataset.objective=eval_spearmanr"),
}


def bad_input_args(tmp_path: Path, case: str) -> list[str]:
    train = write_table(tmp_path / "train.csv", reviews(12, kind="mood"))
    dev = write_table(tmp_path / "dev.csv", reviews(6, start=40, kind="mood"))
    args = ["dataset=files", f"dataset.train_file={train}", f"dataset.eval_file={dev}", "dataset.text_columns=[review]"]
    if case == "missing_column":
        args.append("dataset.text_columns=[body]")
    elif case == "unseen_label":
        write_table(dev, [{"review": "a", "label": "good"}, {"review": "b", "label": "terrible"}])
    elif case == "wrong_glue_folder":
        args = ["dataset=cola", f"dataset.data_dir={glue_folder(tmp_path, 'sst2')}"]
    elif case == "objective":
        write_table(train, reviews(12, kind="score"))
        write_table(dev, reviews(6, start=40, kind="score"))
    return [*FAST, *args]


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_refused_by_the_stages_preflight_in_one_line(tmp_path, case):
    with pytest.raises(UserError) as e:
        train_stage.preflight(compose(*bad_input_args(tmp_path, case)))
    assert "\n" not in str(e.value)
    for fragment in BAD_INPUT[case]:
        assert fragment in str(e.value), str(e.value)


@pytest.mark.slow  # the CLI contract; the messages are checked in-process above
def test_bad_input_through_the_cli_is_one_line_and_writes_nothing(tmp_path):
    job = tmp_path / "job"
    proc = run_cli(*bad_input_args(tmp_path, "missing_column"), f"hydra.run.dir={job}")
    assert_one_line_error(proc, *BAD_INPUT["missing_column"])
    assert not [p for p in job.iterdir() if p.name not in (".hydra", "nlpwf.log")]


def test_config_mistakes_in_the_task_keys():
    from nlpwf.config.checks import check_job

    for override, message in [("dataset.problem=ordinal", "dataset.problem=ordinal is unknown"),
                              ("dataset.text_columns=[a,b,c]", "give one text column or two")]:
        with pytest.raises(UserError, match=message):
            check_job(compose(override))
    with pytest.raises(UserError, match="does not fit GLUE's STS-B"):
        load_splits(compose("dataset=stsb", "dataset.problem=classification", "dataset.data_dir=.").dataset)


# ---- what a task reports ----------------------------------------------------------------------

@pytest.mark.parametrize("dataset, objective", [
    ("paraphrase_sample", "eval_accuracy"), ("mrpc", "eval_accuracy"), ("cola", "eval_matthews_correlation"),
    ("stsb", "eval_spearmanr"), ("mnli", "eval_accuracy"), ("sst2", "eval_accuracy"), ("files", "eval_accuracy"),
])
def test_each_dataset_option_names_its_main_metric_as_the_objective(dataset, objective):
    cfg = compose(f"dataset={dataset}")
    assert cfg.objective == objective
    assert compose(f"dataset={dataset}", "hparams_search=optuna").objective == objective
    task = cfg.dataset.get("task")
    if task:
        assert f"eval_{metrics.main_metric(task, 1 if task == 'stsb' else 2)}" == objective


def test_metrics_by_task():
    labels, logits = np.array([0, 1, 1, 0, 1]), np.array([[2, 1], [0, 3], [1, 0], [3, 1], [0, 1]], dtype=float)
    cola = metrics.scores("cola", 2, labels, logits)
    assert list(cola) == ["matthews_correlation", "accuracy"] and cola["accuracy"] == 0.8
    mrpc = metrics.scores("mrpc", 2, labels, logits)
    assert list(mrpc) == ["accuracy", "f1", "combined_score"] and mrpc["combined_score"] == pytest.approx((0.8 + mrpc["f1"]) / 2)
    assert list(metrics.scores("rte", 2, labels, logits)) == ["accuracy"]
    three = metrics.scores(None, 3, np.array([0, 1, 2, 2]), np.eye(3)[[0, 1, 2, 0]])
    assert list(three) == ["accuracy", "macro_f1"] and three["accuracy"] == 0.75
    score = metrics.scores("stsb", 1, [1.0, 2.0, 3.0, 4.0], [[1.1], [1.9], [3.2], [3.9]])
    assert list(score) == ["spearmanr", "pearson", "combined_score", "mse"] and score["spearmanr"] == 1.0
    assert list(metrics.scores(None, 1, [1.0, 2.0], [[0.5], [0.5]])) == ["spearmanr", "pearson", "mse"]
    assert metrics.scores(None, 1, [1.0, 2.0, 3.0], [[0.5], [0.5], [0.5]])["pearson"] == 0.0  # constant: not NaN
    assert metrics.confusion([0, 1, 2], [0, 2, 2], 3) == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]


def test_the_objective_must_be_a_metric_of_the_task():
    check_objective("eval_matthews_correlation", Task("cola", ("sentence",), "label", ("unacceptable", "acceptable")))
    with pytest.raises(UserError, match="objective=eval_accuracy is not a metric of this score .* set dataset.objective=eval_spearmanr"):
        check_objective("eval_accuracy", Task("files", ("a", "b"), "sim"))
    with pytest.raises(UserError, match="reports eval_accuracy, eval_macro_f1, eval_loss"):
        check_objective("eval_f1", Task("files", ("text",), "label", ("a", "b", "c")))


def test_the_sweep_summary_shows_the_objective_column(tmp_path):
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"hydra": {"launcher": {}, "runtime": {"output_dir": str(tmp_path)}, "job": {"num": 0}}})
    (tmp_path / "metrics.json").write_text('{"eval_spearmanr": 0.8, "eval_loss": 1.2}')
    run = JobReturn(overrides=["training.seed=1"], status=JobStatus.COMPLETED, hydra_cfg=cfg)
    row = summary.row(run, objective="eval_spearmanr")
    assert row["eval_spearmanr"] == 0.8 and "eval_spearmanr" not in summary.row(run)
    table = summary.Summary(tmp_path / "sweep", "eval_spearmanr")
    table.add([run])
    assert "eval_spearmanr" in table.table().splitlines()[0] and "best eval_spearmanr: 0.8000" in table.table()


def test_the_task_round_trips_through_a_saved_config(tmp_path):
    from transformers import AutoConfig, BertConfig

    task = Task("cola", ("sentence",), "label", ("unacceptable", "acceptable"))
    tiny = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8}
    BertConfig(**tiny, **task.model_config()).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.id2label == {0: "unacceptable", 1: "acceptable"} and config.problem_type == "single_label_classification"
    assert Task.from_model_config(config) == task
    score = Task("stsb", ("sentence1", "sentence2"), "label")
    assert score.model_config()["id2label"] == {0: "score"} and score.model_config()["problem_type"] == "regression"
    # A model nlpwf saved before tasks (two labels, transformers' names, no columns): a pair classifier.
    old = Task.from_model_config(BertConfig(num_labels=2))
    assert old.text_columns == ("sentence1", "sentence2") and old.labels == ("LABEL_0", "LABEL_1")
    assert old.shown_labels() == ["0", "1"]


def test_data_labels_map_onto_a_saved_models_by_name():
    model = Task("x", ("t",), "label", ("neg", "pos"))
    assert relabel(Task("x", ("t",), "label", ("neg", "pos")), model) == [0, 1]
    assert relabel(Task("x", ("t",), "label", ("pos",)), model) == [1]
    unnamed = Task("", ("a", "b"), "label", ("LABEL_0", "LABEL_1"))
    assert relabel(Task("mrpc", ("a", "b"), "label", ("not_equivalent", "equivalent")), unnamed) == [0, 1]
    with pytest.raises(UserError, match="the model's labels \\(neg, pos\\) are not the data's \\(a, b\\)"):
        relabel(Task("x", ("t",), "label", ("a", "b")), model)
    with pytest.raises(UserError, match="the model predicts classes but the data's label is a score"):
        relabel(Task("x", ("t",), "label"), model)


# ---- end to end: train, then the serving stages, on tiny random BERTs ----------------------------

TINY_TRAIN = ["model=tiny_bert", "training.num_train_epochs=2", "training.disable_tqdm=true", "training.logging_steps=1",
              "training.learning_rate=1e-3", "training.save_strategy=no"]


def train_job(tmp_path: Path, *args: str, name: str = "job") -> tuple[Path, dict]:
    job = tmp_path / name
    proc = run_cli(*TINY_TRAIN, *args, f"hydra.run.dir={job}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return job, json.loads((job / "metrics.json").read_text())


@pytest.mark.slow
def test_files_single_text_classification_from_csv_with_names_in_the_saved_model(tmp_path):
    train = write_table(tmp_path / "train.csv", reviews(60, kind="mood"))
    dev = write_table(tmp_path / "dev.csv", reviews(15, start=100, kind="mood"))
    test = write_table(tmp_path / "test.csv", [{"id": r["id"], "review": r["review"]} for r in reviews(7, start=300)])
    job, m = train_job(tmp_path, "dataset=files", f"dataset.train_file={train}", f"dataset.eval_file={dev}",
                       f"dataset.test_file={test}", "dataset.text_columns=[review]")
    assert {"eval_accuracy", "eval_macro_f1"} <= set(m) and "eval_f1" not in m
    assert m["labels"] == ["bad", "good", "meh"] and m["objective"] == "eval_accuracy"
    assert m["problem_type"] == "single_label_classification"
    from transformers import AutoModelForSequenceClassification, pipeline

    model = AutoModelForSequenceClassification.from_pretrained(job / "model")
    assert model.config.id2label == {0: "bad", 1: "good", 2: "meh"} and model.config.text_columns == ["review"]
    classify = pipeline("text-classification", model=str(job / "model"), device="cpu")
    assert classify("broke after a day")[0]["label"] in ("bad", "good", "meh")
    # dataset.test_file: predicted after training, as stage=predict writes it
    out = list(csv.DictReader((job / "test_predictions.csv").open()))
    assert len(out) == 7 and {r["predicted_label"] for r in out} <= {"bad", "good", "meh"}
    assert all(abs(sum(float(r[f"probability_{n}"]) for n in ("bad", "good", "meh")) - 1) < 1e-3 for r in out)
    assert m["test_predictions"] == str(job / "test_predictions.csv")


@pytest.mark.slow
def test_files_pair_regression_from_jsonl_then_evaluate_predict_quantize(tmp_path):
    train = write_table(tmp_path / "train.jsonl", similarity(64))
    dev = write_table(tmp_path / "dev.jsonl", similarity(16, start=200))
    data = ["dataset=files", f"dataset.train_file={train}", f"dataset.eval_file={dev}", "dataset.text_columns=[first,second]",
            "dataset.label_column=sim", "dataset.objective=eval_spearmanr",
            "precision=fp32"]  # quantize's baseline is the fp32 model: train and evaluate in fp32 to compare with it
    job, m = train_job(tmp_path, *data)
    assert {"eval_spearmanr", "eval_pearson", "eval_mse"} <= set(m) and "eval_accuracy" not in m
    assert m["problem_type"] == "regression" and m["labels"] == ["score"]
    model = job / "model"

    ev = run_cli("stage=evaluate", f"stage.model_path={model}", *data, f"hydra.run.dir={tmp_path / 'ev'}")
    assert ev.returncode == 0, ev.stderr[-2000:]
    scored = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert scored["eval_spearmanr"] == pytest.approx(m["eval_spearmanr"], abs=1e-4) and "eval_confusion_matrix" not in scored

    source = write_table(tmp_path / "pairs.csv", [{"first": r["first"], "second": r["second"]} for r in similarity(5)])
    pr = run_cli("stage=predict", f"stage.model_path={model}", f"stage.input={source}", f"hydra.run.dir={tmp_path / 'pr'}")
    assert pr.returncode == 0, pr.stderr[-2000:]
    out = list(csv.DictReader((tmp_path / "pr" / "predictions.csv").open()))
    assert list(out[0]) == ["first", "second", "predicted_score"]
    assert all(np.isfinite(float(r["predicted_score"])) for r in out)

    qu = run_cli("stage=quantize", f"stage.model_path={model}", "stage.backend=torch_dynamic", "stage.tolerance=100",
                 "stage.calibration_samples=16", *data, f"hydra.run.dir={tmp_path / 'qu'}")
    assert qu.returncode == 0, qu.stderr[-2000:]
    q = json.loads((tmp_path / "qu" / "metrics.json").read_text())
    assert q["gate_metric"] == "eval_spearmanr" and q["fp32_spearmanr"] == pytest.approx(m["eval_spearmanr"], abs=1e-4)
    assert q["loss_points"] == pytest.approx(100 * (q["fp32_spearmanr"] - q["eval_spearmanr"]), abs=1e-3)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "qu" / "model_int8").problem_type == "regression"  # INT8 keeps the task


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["csv_pairs_classification", "jsonl_single_regression"])
def test_files_train_with_two_ddp_processes(tmp_path, kind):
    if kind == "csv_pairs_classification":
        rows = [{"sentence1": a, "sentence2": b, "label": ["no", "yes"][lab]} for lab, _, _, a, b in pairs(48)]
        train, dev = write_table(tmp_path / "train.csv", rows), write_table(tmp_path / "dev.csv", rows[:12])
        extra = []
    else:
        train = write_table(tmp_path / "train.jsonl", reviews(48, kind="score"))
        dev = write_table(tmp_path / "dev.jsonl", reviews(12, start=80, kind="score"))
        extra = ["dataset.text_columns=[review]", "dataset.objective=eval_spearmanr"]
    job, m = train_job(tmp_path, "dataset=files", f"dataset.train_file={train}", f"dataset.eval_file={dev}", *extra,
                       "compute.processes_per_node=2")
    assert m["world_size"] == 2 and len(set(m["parameter_digests"])) == 1
    assert ("eval_f1" in m and m["labels"] == ["no", "yes"]) if kind.startswith("csv") else "eval_spearmanr" in m


@pytest.mark.slow
def test_glue_cola_and_stsb_folders_train_and_predict_names_and_scores(tmp_path):
    cola = glue_folder(tmp_path, "cola", n_train=64, n_dev=16)
    job, m = train_job(tmp_path, "dataset=cola", f"dataset.data_dir={cola}", name="cola")
    assert "eval_matthews_correlation" in m and m["objective"] == "eval_matthews_correlation"
    pr = run_cli("stage=predict", f"stage.model_path={job / 'model'}", f"stage.input={cola / 'test.tsv'}",
                 f"hydra.run.dir={tmp_path / 'pc'}")
    assert pr.returncode == 0, pr.stderr[-2000:]
    lines = (tmp_path / "pc" / "predictions.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["index", "sentence", "predicted_label", "probability",
                                    "probability_unacceptable", "probability_acceptable"]
    assert {line.split("\t")[2] for line in lines[1:]} <= {"unacceptable", "acceptable"} and len(lines) == 7

    stsb = glue_folder(tmp_path, "stsb", n_train=64, n_dev=16)
    job, m = train_job(tmp_path, "dataset=stsb", f"dataset.data_dir={stsb}", name="stsb")
    assert {"eval_pearson", "eval_spearmanr", "eval_combined_score"} <= set(m) and m["objective"] == "eval_spearmanr"
    pr = run_cli("stage=predict", f"stage.model_path={job / 'model'}", f"stage.input={stsb / 'test.tsv'}",
                 f"hydra.run.dir={tmp_path / 'ps'}")
    assert pr.returncode == 0, pr.stderr[-2000:]
    lines = (tmp_path / "ps" / "predictions.tsv").read_text().splitlines()
    assert lines[0].endswith("sentence2\tpredicted_score") and len(lines) == 7
    assert all(np.isfinite(float(line.split("\t")[-1])) for line in lines[1:])


@pytest.mark.slow
def test_mnli_reports_matched_and_mismatched(tmp_path):
    folder = glue_folder(tmp_path, "mnli", n_train=48, n_dev=12)
    _, m = train_job(tmp_path, "dataset=mnli", f"dataset.data_dir={folder}")
    assert {"eval_accuracy", "eval_mismatched_accuracy"} <= set(m) and m["labels"] == ["entailment", "neutral", "contradiction"]


@pytest.mark.slow
def test_the_topic_sample_trains_and_a_sweep_reports_the_task_objective(tmp_path):
    sweep = tmp_path / "sweep"
    fixed = [a for a in TINY_TRAIN if not a.startswith("training.learning_rate=")]
    proc = run_cli("--multirun", *fixed, "dataset=stsb", f"dataset.data_dir={glue_folder(tmp_path, 'stsb')}",
                   "training.learning_rate=1e-3,3e-3", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 2 and all(r["eval_spearmanr"] for r in rows)
    assert "best eval_spearmanr" in proc.stdout + proc.stderr
    _, m = train_job(tmp_path, "dataset=topic_sample", "dataset.max_train_samples=100", name="topics")
    assert m["labels"] == ["business", "science", "sport", "travel", "weather"] and "eval_macro_f1" in m
