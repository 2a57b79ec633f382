"""Training without the padding (nlpwf/training/unpad.py) computes what the padded model computes.

Unit level: tiny random BERTs, the same batch through the padded and the unpadded forward in
training mode (dropout on: its masks are drawn in the padded shape, so they match), the same
loss, logits and gradients; single sentences and sentence pairs; sdpa and eager attention; the
batches it leaves to the model's own forward. End to end: the same tiny training with
perf.unpad on and off gives the same loss trace. No timing here: the benchmark measures speed.
"""
from __future__ import annotations

import csv
import inspect
import json
import logging

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel, DistilBertConfig, DistilBertForSequenceClassification

from nlpwf.training import unpad

from conftest import TINY, run_cli

VOCAB = 100


def tiny_bert(attn: str = "sdpa", **config) -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, attn_implementation=attn, **{"num_labels": 2, **config})
    return BertForSequenceClassification(cfg).train()


def batch(lengths: list[int], pairs: bool = True, seed: int = 1, extra: int = 3) -> dict:
    """Right-padded batch with [CLS] A [SEP] (B [SEP]) token types, as a BERT tokenizer makes them;
    `extra` columns of padding beyond the longest (pad_to_multiple_of does that)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths) + extra
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(5, VOCAB, (n,), generator=g)
        ids[row, 0] = 1
        mask[row, :n] = 1
        if pairs and n > 4:
            types[row, n // 2:n] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (len(lengths),), generator=g)}
    if pairs:
        out["token_type_ids"] = types
    return out


def step(model, inputs: dict, bf16: bool = False, seed: int = 7):
    """Loss, logits and gradients of one training step from a fixed RNG state (dropout)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach().float(), out.logits.detach().float(), grads


def both(model, inputs, **kw):
    unpad.remove(model)
    padded = step(model, inputs, **kw)
    assert unpad.apply(model) is None
    unpadded = step(model, inputs, **kw)
    unpad.remove(model)
    return padded, unpadded


def assert_same(padded, unpadded, tol: float):
    (loss_p, logits_p, grads_p), (loss_u, logits_u, grads_u) = padded, unpadded
    assert abs(loss_p.item() - loss_u.item()) <= tol * max(1.0, abs(loss_p.item())), (loss_p, loss_u)
    assert torch.allclose(logits_p, logits_u, rtol=tol, atol=tol)
    assert grads_p.keys() == grads_u.keys()
    # relative to the largest gradient: some (the key biases) are zero in exact arithmetic and rounding noise here
    scale = max(g.abs().max().item() for g in grads_p.values())
    worst = max((grads_p[n] - grads_u[n]).abs().max().item() for n in grads_p)
    assert worst <= tol * scale, (worst, scale)


LENGTHS = [9, 3, 17, 12, 5, 17, 1 + 6]  # ragged, two at the longest, one short


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pairs", [True, False], ids=["pairs", "single"])
def test_unpadded_step_computes_the_padded_loss_and_gradients_fp32(attn, pairs):
    model = tiny_bert(attn)
    assert_same(*both(model, batch(LENGTHS, pairs)), tol=1e-5)


@pytest.mark.parametrize("pairs", [True, False], ids=["pairs", "single"])
def test_unpadded_step_computes_the_padded_loss_and_gradients_bf16(pairs):
    model = tiny_bert()
    assert_same(*both(model, batch(LENGTHS, pairs), bf16=True), tol=3e-2)


def test_dropout_masks_follow_the_padded_model():
    """With dropout the losses still agree: the masks are the padded model's. And the RNG ends
    where the padded model leaves it, so the next step's masks agree too."""
    model = tiny_bert(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    inputs = batch(LENGTHS)
    unpad.remove(model)
    torch.manual_seed(3)
    padded = [model(**inputs).loss.item() for _ in range(2)]
    after_padded = torch.rand(1)
    unpad.apply(model)
    torch.manual_seed(3)
    unpadded = [model(**inputs).loss.item() for _ in range(2)]
    after_unpadded = torch.rand(1)
    assert padded == pytest.approx(unpadded, abs=1e-5) and padded[0] != padded[1]
    assert torch.equal(after_padded, after_unpadded)


def test_without_dropout_it_computes_the_padded_step_and_draws_nothing():
    """Dropout off (mrpc_minilm, cola_minilm): the same loss and gradients, and no random draws,
    so the generator is where it started."""
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    padded, unpadded = both(model, batch(LENGTHS))
    after = torch.get_rng_state()
    torch.manual_seed(7)  # what `step` seeded before the unpadded forward
    assert torch.equal(after, torch.get_rng_state())
    assert_same(padded, unpadded, tol=1e-5)


def test_eval_logits_match_and_position_ids_are_honoured():
    model = tiny_bert().eval()
    inputs = {k: v for k, v in batch(LENGTHS).items() if k != "labels"}
    unpad.remove(model)
    with torch.no_grad():
        padded = model(**inputs).logits
        shifted = model(**inputs, position_ids=torch.arange(inputs["input_ids"].shape[1]).flip(0)[None]).logits
    unpad.apply(model)
    with torch.no_grad():
        assert torch.allclose(padded, model(**inputs).logits, atol=1e-5)
        assert torch.allclose(shifted, model(**inputs, position_ids=torch.arange(inputs["input_ids"].shape[1]).flip(0)[None]).logits,
                              atol=1e-5)


def test_packing_rounds_its_rows_up_with_the_first_padding_tokens():
    """The packed row count is a multiple of `rows` (oneDNN then meets few matrix shapes), made up
    with padding tokens, never more than the batch has; each row's first token is found again."""
    mask = batch(LENGTHS)["attention_mask"]
    real = set(mask.flatten().nonzero().flatten().tolist())
    for rows, expected in ((1, 70), (16, 80), (32, 96), (512, mask.numel())):
        pack = unpad.Packing(mask, rows)
        index = pack.index.tolist()
        assert len(index) == expected and index == sorted(index) and real <= set(index)
        assert (pack.index.index_select(0, pack.first) == torch.arange(len(LENGTHS)) * mask.shape[1]).all()
    assert mask.sum() == 70  # Packing left the caller's mask alone


def test_attention_groups_pad_each_group_only_to_its_longest():
    """Training attention runs on groups of GROUP sequences sorted by length, each as wide as its
    longest (rounded up to ROWS in bf16, whose oneDNN kernels are built per shape), and every
    packed token comes back from exactly one slot."""
    lengths = [9, 3, 17, 12, 5, 17, 7, 2, 4]
    mask = batch(lengths)["attention_mask"]
    pack = unpad.Packing(mask, unpad.ROWS)
    rows = pack.rows.tolist()  # the rounding rows are counted with the sequences they pad
    assert sum(rows) == len(pack.index) == 80
    groups = unpad.Groups(pack, mask, heads=4, dtype=torch.float32)
    by_length = sorted(range(len(lengths)), key=lambda i: -rows[i])
    assert [g.seqs.tolist() for g in groups.groups] == [by_length[:4], by_length[4:8], by_length[8:]]
    assert [g.width for g in groups.groups] == [rows[by_length[0]], rows[by_length[4]], rows[by_length[8]]]
    assert len(set(groups.back.tolist())) == len(pack.index)
    widths = [g.width for g in unpad.Groups(pack, mask, heads=4, dtype=torch.bfloat16).groups]
    assert all(w % unpad.ROWS == 0 for w in widths) and widths[-1] < widths[0]


def test_grouped_attention_keeps_the_padded_maths_with_holes_in_the_mask():
    """Three groups, the last of one sequence; a mask with holes inside sequences (keys the padded
    model masks where they are); dropout on, so the attention masks must be cut where the padded
    model's slots are."""
    model = tiny_bert(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.3)
    inputs = batch([9, 3, 17, 12, 5, 17, 7, 2, 4])
    inputs["attention_mask"][0, 4] = 0
    inputs["attention_mask"][2, 10:12] = 0
    assert_same(*both(model, inputs), tol=1e-5)
    assert_same(*both(model, inputs, bf16=True), tol=3e-2)


def test_the_classifier_computes_its_last_layer_for_the_pooled_token_only():
    """The head reads only the pooled first token, so the last layer's feed-forward sees one row a
    sequence, in training and evaluation, and the step is still the padded one (the tests above
    run through it too; here with dropout drawn in that layer). The encoder called on its own is
    the stock one: every token, padded."""
    model = tiny_bert(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    inputs = batch(LENGTHS)
    rows = []
    for layer in model.bert.encoder.layer:
        layer.intermediate.dense.register_forward_hook(lambda m, args, out: rows.append(args[0].numel() // args[0].shape[-1]))
    padded, unpadded = both(model, inputs)
    assert rows == [140, 140, 80, len(LENGTHS)]  # padded (7 x 20 tokens), then packed (80 rows) and the pooled ones
    assert_same(padded, unpadded, tol=1e-5)

    unlabelled = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        model.eval()
        expected = model(**unlabelled).logits
        full = model.bert(**unlabelled).last_hidden_state
        assert unpad.apply(model) is None
        rows.clear()
        assert torch.allclose(model(**unlabelled).logits, expected, atol=1e-5)
        assert rows == [80, len(LENGTHS)]
        rows.clear()
        assert torch.equal(model.bert(**unlabelled).last_hidden_state, full) and rows == [140, 140]


def test_batches_it_cannot_pack_run_the_models_own_forward():
    model = tiny_bert()
    unpad.apply(model)
    full = batch([8, 8, 8], extra=0)             # no padding: nothing to remove
    left = batch([8, 5, 3])
    left["attention_mask"] = left["attention_mask"].flip(1)  # left padding: the padded model pools a pad token
    left["input_ids"] = left["input_ids"].flip(1)
    for inputs in (full, left):
        model(**inputs)
    out = model(**batch([8, 5]), output_hidden_states=True)  # asked for what only the padded forward records
    assert len(out.hidden_states) == 3
    loss, logits = model(**batch([8, 5]), return_dict=False)  # a tuple, as the stock forward returns it
    assert logits.shape == (2, 2)
    model(**batch([8, 5]))
    model(**batch([8, 5]), num_items_in_batch=2)  # Trainer passes the loss's item count: nothing BERT's loss uses
    assert unpad.counts(model) == {"perf_unpadded_batches": 2, "perf_padded_batches": 4}


def test_models_it_does_not_know_are_left_padded():
    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    assert "not a BertForSequenceClassification" in unpad.apply(distil) and not unpad.is_applied(distil)
    decoder = tiny_bert(is_decoder=True)
    assert "decoder" in unpad.apply(decoder) and not unpad.is_applied(decoder)

    class Linear(torch.nn.Linear):  # stands for a LoRA or quantized layer with its own forward (PEFT's is named so)
        pass

    adapted = tiny_bert()
    old = adapted.bert.encoder.layer[1].attention.self.value
    adapted.bert.encoder.layer[1].attention.self.value = Linear(old.in_features, old.out_features)
    reason = unpad.apply(adapted)
    assert reason.startswith("bert.encoder.layer.1.attention.self.value is a test_unpad.") and not unpad.is_applied(adapted)
    assert reason.endswith("<locals>.Linear, not the Linear unpadding computes with")


def test_a_bert_built_otherwise_trains_padded_with_the_reason(caplog):
    """A transformers release that lays BERT out otherwise (here: Q, K and V from one fused layer)
    is caught by the check before a step: apply says which part differs and the model keeps its
    own forward, which computes the padded loss. A model changed after apply runs padded from
    then on, with one warning."""
    model = tiny_bert()
    inputs = batch(LENGTHS)
    torch.manual_seed(7)
    expected = model(**inputs).loss
    sa = model.bert.encoder.layer[0].attention.self
    stock = sa.query, sa.key, sa.value
    fused = torch.nn.Linear(32, 96)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in stock]))
        fused.bias.copy_(torch.cat([p.bias for p in stock]))
    sa.query, sa.key, sa.value = (FromFused(fused, i) for i in range(3))
    assert unpad.apply(model) == ("bert.encoder.layer.0.attention.self.query is a test_unpad.FromFused, "
                                  "not the Linear unpadding computes with")
    assert "forward" not in model.__dict__
    torch.manual_seed(7)
    assert torch.allclose(model(**inputs).loss, expected, atol=1e-6)
    del sa.query
    assert "has no bert.encoder.layer.0.attention.self.query here" in unpad.apply(model)
    sa.query, sa.key, sa.value = stock

    assert unpad.apply(model) is None
    model.bert.embeddings.dropout = Dropout(0.1)
    with caplog.at_level(logging.WARNING, logger="nlpwf.training.unpad"):
        for _ in range(2):
            torch.manual_seed(7)
            assert torch.allclose(model(**inputs).loss, expected, atol=1e-6)
    assert [r.getMessage() for r in caplog.records] == [
        "perf.unpad: the model changed since unpadding was applied (bert.embeddings.dropout is a test_unpad.Dropout, "
        "not the Dropout unpadding computes with), so it computes the padded batches"]
    assert unpad.counts(model) == {"perf_unpadded_batches": 0, "perf_padded_batches": 2}


class FromFused(torch.nn.Module):
    """One of Q, K, V from a fused projection: the same numbers, another layout."""

    def __init__(self, qkv: torch.nn.Linear, part: int):
        super().__init__()
        self.qkv, self.part = qkv, part

    def forward(self, x):
        return self.qkv(x).chunk(3, dim=-1)[self.part]


class Dropout(torch.nn.Module):
    """A dropout that is not torch's: unpadding could not draw its mask as the padded model does."""

    def __init__(self, p):
        super().__init__()
        self.inner = torch.nn.Dropout(p)

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("labels", ["regression", "multi_label"])
def test_other_heads_losses_are_the_padded_models(labels):
    """The loss is transformers' for the head (bert_parts.loss): a score (STS-B) and several labels a row."""
    if labels == "regression":
        model = tiny_bert(num_labels=1)
        inputs = {**batch(LENGTHS), "labels": torch.linspace(0, 5, len(LENGTHS))}
    else:
        model = tiny_bert(num_labels=3, problem_type="multi_label_classification")
        inputs = {**batch(LENGTHS), "labels": (torch.arange(len(LENGTHS) * 3).view(-1, 3) % 2).float()}
    padded, unpadded = both(model, inputs)
    assert_same(padded, unpadded, tol=1e-5)
    assert model.config.problem_type == ("regression" if labels == "regression" else "multi_label_classification")


def test_the_model_saves_and_reloads_as_the_plain_bert(tmp_path):
    model = tiny_bert()
    keys = set(model.state_dict())
    unpad.apply(model)
    assert type(model) is BertForSequenceClassification and type(model.bert) is BertModel
    assert set(model.state_dict()) == keys and unpad.is_applied(model)
    # the Trainer keeps the dataset columns the forward names
    assert list(inspect.signature(model.forward).parameters)[:6] == [
        "input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "labels"]
    model.save_pretrained(tmp_path / "m")
    again = BertForSequenceClassification.from_pretrained(tmp_path / "m")
    assert type(again.bert).__name__ == "BertModel" and "forward" not in again.__dict__
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]


# ---- end to end: perf.unpad on and off, the same loss trace ------------------------------

POOLED = "on, last layer for the pooled token only"  # a sequence classifier's metrics.json


def losses(job) -> list[float]:
    with (job / "train_log.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")]


def train(tmp_path, name: str, *args: str) -> tuple[dict, list[float]]:
    job = tmp_path / name
    proc = run_cli(*TINY, "training.train_sampling_strategy=random", "training.learning_rate=1e-3", *args, f"hydra.run.dir={job}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((job / "metrics.json").read_text()), losses(job)


@pytest.mark.slow
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("bf16", 2e-2)])
def test_training_with_and_without_unpad_gives_the_same_loss_trace(tmp_path, precision, tol):
    """Dropout on (the tiny BERT's 0.1): the same masks either way, so the traces agree step by step."""
    on, on_losses = train(tmp_path, "on", f"precision={precision}", "perf.unpad=true")
    off, off_losses = train(tmp_path, "off", f"precision={precision}", "perf.unpad=false")
    assert on["perf_unpad"] == POOLED and on["perf_unpadded_batches"] == on["perf_train_batches"] > 0
    assert off["perf_unpad"] == "off" and off["perf_unpadded_batches"] == 0
    assert len(on_losses) == len(off_losses) == 4 and len(set(on_losses)) > 1
    assert max(abs(a - b) for a, b in zip(on_losses, off_losses)) < tol
    assert abs(on["eval_loss"] - off["eval_loss"]) < tol


@pytest.mark.slow
def test_ddp_training_with_and_without_unpad_gives_the_same_loss_trace(tmp_path):
    ddp = ["compute.processes_per_node=2", "training.per_device_train_batch_size=8"]
    on, on_losses = train(tmp_path, "on", *ddp, "perf.unpad=true")
    off, off_losses = train(tmp_path, "off", *ddp, "perf.unpad=false")
    assert on["perf_unpad"] == POOLED and on["world_size"] == 2
    assert on["parameter_digests"][0] == on["parameter_digests"][1]
    assert max(abs(a - b) for a, b in zip(on_losses, off_losses)) < 1e-4


def test_bf16_softmax_gives_the_fp32_softmax_rounded_once():
    """What unpad's attention relies on without dropout: torch's bf16 softmax is the fp32 softmax
    cast to bf16, so skipping the fp32 copy changes no probability."""
    scores = (torch.randn(24, 16, 48, generator=torch.Generator().manual_seed(0)) * 6).to(torch.bfloat16)
    scores[..., 40:] = torch.finfo(torch.bfloat16).min  # masked keys, as the attention mask adds them
    assert torch.equal(torch.softmax(scores, dim=-1), torch.softmax(scores, dim=-1, dtype=torch.float32).to(torch.bfloat16))
