"""Model sources load offline; limits are known before weights load."""
from __future__ import annotations

import pytest
import torch

from nlpwf import models
from nlpwf.errors import UserError
from nlpwf.runtime import network

from conftest import compose


def test_minilm_loads_offline_from_its_package():
    cfg = compose("model=minilm_l6").model
    tok = models.load_tokenizer(cfg)
    model = models.load_model(cfg)
    assert model.config.model_type == "bert" and model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert model.config.num_labels == 2
    enc = tok("The cat sat .", "A cat was sitting .", return_tensors="pt")
    assert enc["token_type_ids"].max() == 1  # a real sentence-pair encoding
    with torch.no_grad():
        assert model(**enc).logits.shape == (1, 2)
    # Pretrained: the encoder weights are MiniLM's, not a fresh init.
    fresh = models.load_model(compose("model=tiny_bert", "model.config.hidden_size=384", "model.config.num_hidden_layers=6",
                                      "model.config.num_attention_heads=12", "model.config.intermediate_size=1536").model)
    w = "bert.embeddings.word_embeddings.weight"
    assert not torch.allclose(model.state_dict()[w], fresh.state_dict()[w])


def test_model_config_overrides_a_pretrained_config_and_is_saved_with_the_model(tmp_path):
    cfg = compose("+model.config.hidden_dropout_prob=0", "+model.config.attention_probs_dropout_prob=0.05").model
    model = models.load_model(cfg, num_labels=3)
    assert model.bert.embeddings.dropout.p == 0 and model.bert.encoder.layer[0].attention.self.dropout.p == 0.05
    assert model.config.num_labels == 3 and model.config.hidden_size == 384  # the rest is the source's
    model.save_pretrained(str(tmp_path))
    assert models.load_saved_config(tmp_path).hidden_dropout_prob == 0


@pytest.mark.parametrize("override,message", [
    ("+model.config.hiden_dropout_prob=0", "hiden_dropout_prob is not a setting of .* config: did you mean hidden_dropout_prob"),
    ("+model.config.hidden_size=512", "hidden_size=512 would reshape minilm_l6's pretrained weights \\(hidden_size is 384\\)"),
    ("+model.config.num_labels=3", "num_labels is set from the data's labels"),
])
def test_model_config_keys_that_cannot_apply_are_refused_before_any_weights_load(override, message):
    with pytest.raises(UserError, match=message):
        models.max_positions(compose(override).model)


def test_model_config_may_restate_a_pretrained_shape():
    assert models.max_positions(compose("+model.config.hidden_size=384", "+model.config.max_position_embeddings=512").model) == 512


def test_tiny_bert_is_random_and_reproducible():
    cfg = compose("model=tiny_bert").model
    from transformers import set_seed

    set_seed(0)
    a = models.load_model(cfg)
    set_seed(0)
    b = models.load_model(cfg)
    assert a.config.hidden_size == 32
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_max_positions_without_loading_weights():
    assert models.max_positions(compose("model=tiny_bert").model) == 128
    assert models.max_positions(compose("model=minilm_l6").model) == 512


def test_hub_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    network.hub_reachable.cache_clear()
    with pytest.raises(UserError, match="Hub is unreachable.*use model=minilm_l6"):
        models.max_positions(compose("model=bert_base_uncased").model)


def test_folder_that_is_not_a_saved_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(UserError, match="does not hold a loadable model"):
        models.load_model(compose(f"model.source={tmp_path}").model)


def test_unknown_package_source():
    with pytest.raises(UserError, match="not installed: pip install no-such-model-pkg"):
        models.resolve_source("package:no_such_model_pkg")
