"""stage=serve: a trained job's model/ (and a quantize job's model_int8/) answered over HTTP by Azure
ML's real inference server (azmlinfsrv, in .venv-serve) with nlpwf's scoring script, on a free
localhost port. One tiny saved model standing for a training job's model/ (the training itself is
tests/test_train.py's), one fp32 server shared by the request tests, one INT8 server that is also
the one stopped with SIGTERM mid-request. The servers are processes of their own (the server's
own venv); the model and its INT8 copy are made in this process."""
from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from nlpwf import stages
from nlpwf.data.splits import load_splits
from nlpwf.inference import scoring, server
from nlpwf.inference.load import load_classifier

from conftest import TINY, compose, run_cli, save_tiny_model, start_cli, wait_for

PAIRS = [("The company said its profit rose .", "Profit at the company went up ."),
         ("Shares fell sharply on Monday .", "The market closed higher ."),
         ("The court ruled in its favour .", "A judge decided against it .")]
READY = re.compile(r"serving (http://127\.0\.0\.1:\d+)/score +\(model (\S+), precision (\w+), backend (\w+)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A job dir with model/ as the quickstart leaves it (its task's label names in config.json), a
    tiny random BERT in place of the training."""
    job = tmp_path_factory.mktemp("quickstart") / "job"
    task, _ = load_splits(compose("experiment=quickstart", *TINY).dataset)
    save_tiny_model(job / "model", **task.model_config())
    return job


def serve(model: Path, log: Path, *extra: str):
    """`python -m nlpwf stage=serve` in the background until its startup line; (process, URL, the line's fields)."""
    proc = start_cli("stage=serve", f"stage.model_path={model}", f"stage.port={server.free_port()}", "precision=fp32",
                     f"hydra.run.dir={log.parent / 'job'}", *extra, log=log)
    found = wait_for(lambda: READY.search(log.read_text()), proc, timeout=300, poll=0.2)
    return proc, found.group(1), found.groups()


def post(url: str, body) -> tuple[int, dict, bytes]:
    status, raw = server.post(url + "/score", body if isinstance(body, bytes) else json.dumps(body).encode())
    return status, json.loads(raw), raw


@pytest.fixture(scope="module")
def fp32(trained, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-fp32") / "serve.log"
    proc, url, fields = serve(trained / "model", log, "stage.max_batch=8")
    yield url, fields, log
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]


def test_three_pairs_get_label_names_and_probabilities_in_input_order(fp32, trained):
    url, fields, _ = fp32
    status, body, _ = post(url, {"inputs": [{"text": a, "text_pair": b} for a, b in PAIRS]})
    assert status == 200, body
    reference = load_classifier(str(trained / "model"), "test", 128, "fp32")
    ids, probs = reference.predict([a for a, _ in PAIRS], [b for _, b in PAIRS])
    names = reference.task.shown_labels()
    assert [p["label"] for p in body["predictions"]] == [names[i] for i in ids]
    for served, row in zip(body["predictions"], probs):
        assert list(served["probabilities"]) == names
        np.testing.assert_allclose([served["probabilities"][n] for n in names], row, atol=1e-5)


def test_startup_log_names_url_model_precision_and_backend(fp32, trained):
    url, (shown_url, model, precision, backend), _ = fp32
    assert shown_url == url and Path(model) == (trained / "model").resolve()
    assert (precision, backend) == ("fp32", "fp32")


def test_liveness_and_readiness_answer_as_on_azure(fp32):
    url = fp32[0]
    assert server.get(url + "/") == (200, b"Healthy")
    status, swagger = server.get(url + "/swagger.json")
    assert status == 200 and "/score" in json.loads(swagger)["paths"]


LONG = " ".join(["word"] * 400)


@pytest.mark.parametrize("body, status, field", [
    (b'{"inputs": [{"text": "a", "text_pair": ', 400, "body"),                  # malformed JSON
    (b"", 400, "body"),                                                           # no body at all
    ({"texts": ["a"]}, 400, "texts"),                                             # unknown field
    ({}, 400, "inputs"),                                                          # missing field
    ({"inputs": [{"text_pair": "b"}]}, 400, "inputs[0].text"),                   # missing item field
    ({"inputs": [{"text": "a"}]}, 400, "inputs[0].text_pair"),                   # a pair model without its pair
    ({"inputs": [{"text": 3, "text_pair": "b"}]}, 400, "inputs[0].text"),        # wrong type
    ({"inputs": [{"text": "a", "text_pair": ["b"]}]}, 400, "inputs[0].text_pair"),
    ({"inputs": 7}, 400, "inputs"),
    ({"inputs": []}, 400, "inputs"),                                              # empty batch
    ({"inputs": [{"text": "a", "text_pair": "b"}] * 9}, 413, "inputs"),          # over stage.max_batch=8
])
def test_a_bad_request_gets_a_4xx_line_naming_the_field_and_the_next_is_answered(fp32, body, status, field):
    url = fp32[0]
    got, answer, raw = post(url, body)
    assert got == status, answer
    assert answer["field"] == field and field in answer["message"]
    assert raw.count(b"\n") == 0 and b"Traceback" not in raw
    assert post(url, {"inputs": [{"text": "a", "text_pair": "b"}]})[0] == 200


def test_a_text_over_the_token_limit_is_truncated(fp32):
    status, body, _ = post(fp32[0], {"inputs": [{"text": LONG, "text_pair": LONG}]})
    assert status == 200 and len(body["predictions"]) == 1


def test_the_contract_refuses_long_texts_when_told_to(trained):
    """too_long=refuse, on the contract itself (the server runs this same function)."""
    classifier = load_classifier(str(trained / "model"), "test", 32, "fp32")
    settings = scoring.Settings(max_length=32, too_long=scoring.REFUSE)
    request = json.dumps({"inputs": [{"text": "short", "text_pair": "pair"}, {"text": LONG, "text_pair": "x"}]})
    with pytest.raises(scoring.BadRequest) as refused:
        scoring.score(classifier, request, settings)
    assert (refused.value.status, refused.value.field) == (413, "inputs[1]")


def slow_request(url: str, body: bytes, sent: threading.Event, answer: list) -> None:
    """A request whose body arrives in two parts: in flight at the server between them."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as s:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body[:10])
        sent.wait(60)
        s.sendall(body[10:])
        answer.append(b"".join(iter(lambda: s.recv(65536), b"")))


@pytest.mark.slow  # a quantize stage and a second server
def test_the_int8_folder_is_served_the_same_way_and_sigterm_drains_it(trained, tmp_path):
    quantized = tmp_path / "quantize"
    quantized.mkdir()
    stages.run(compose(f"stage.model_path={trained / 'model'}", "stage=quantize", "stage.backend=torch_dynamic",
                       "stage.tolerance=100", *TINY[1:3]), quantized)
    log = tmp_path / "serve.log"
    serving, url, (_, model, precision, backend) = serve(quantized / "model_int8", log)
    assert (Path(model).name, precision, backend) == ("model_int8", "int8", "torch_dynamic")
    status, body, _ = post(url, {"inputs": [{"text": a, "text_pair": b} for a, b in PAIRS]})
    assert status == 200 and len(body["predictions"]) == 3
    sent, answer = threading.Event(), []
    request = json.dumps({"inputs": [{"text": PAIRS[0][0], "text_pair": PAIRS[0][1]}]}).encode()
    client = threading.Thread(target=slow_request, args=(url, request, sent, answer))
    client.start()
    time.sleep(1.0)  # the idle worker accepts at once and then waits for the rest of the body
    serving.send_signal(signal.SIGTERM)
    wait_for(lambda: "Handling signal: term" in (Path(log.parent / "job" / "server.log").read_text()), serving, timeout=60)
    sent.set()
    client.join(120)
    assert serving.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert answer and answer[0].startswith(b"HTTP/1.1 200"), answer
    assert len(json.loads(answer[0].split(b"\r\n\r\n", 1)[1])["predictions"]) == 1
    assert "every request it had accepted was answered" in log.read_text()


@pytest.mark.slow
def test_the_readmes_quickstart_then_serve_answers_three_pairs(tmp_path):
    """The chain a user follows, all through the CLI: `experiment=quickstart` trains (on the tiny
    model), `stage=serve` on its model/ answers three pairs, refuses a bad request with one line and
    answers the next, and SIGTERM ends it with exit 0."""
    job = tmp_path / "job"
    proc = run_cli("experiment=quickstart", *TINY, f"hydra.run.dir={job}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "serve").mkdir()
    serving, url, (_, model, precision, _) = serve(job / "model", tmp_path / "serve" / "serve.log")
    assert Path(model) == (job / "model").resolve() and precision == "fp32"
    status, body, _ = post(url, {"inputs": [{"text": a, "text_pair": b} for a, b in PAIRS]})
    assert status == 200, body
    names = json.loads((job / "model" / "config.json").read_text())["id2label"].values()
    assert all(p["label"] in names and set(p["probabilities"]) == set(names) for p in body["predictions"])
    assert len(body["predictions"]) == 3
    status, answer, raw = post(url, b"{")
    assert status == 400 and raw.count(b"\n") == 0
    assert post(url, {"inputs": [{"text": "a", "text_pair": "b"}]})[0] == 200
    serving.send_signal(signal.SIGTERM)
    assert serving.wait(timeout=120) == 0
