"""formats/rebuild.py: a loaded model's HF face is rebuilt from transformers' own class, over the loaded tensors."""

from __future__ import annotations

import pytest
import torch
from helpers.common import tiny_bert_classifier

import lowrank_compiler as lrc
from lowrank_compiler.errors import LoadError
from lowrank_compiler.formats.rebuild import rebuild_hf_model, transformers_class
from lowrank_compiler.ir import lrc_meta


@pytest.mark.parametrize("name", ["os.system", "__import__", "Module", "LrcGraphModule", "", 3, None])
def test_only_classes_transformers_defines(name):
    assert transformers_class(name) is None


def test_rebuilt_model_shares_the_graph_tensors_and_refuses_a_bad_config():
    import transformers as tf

    assert transformers_class("BertForSequenceClassification") is tf.BertForSequenceClassification
    model, ids, kw = tiny_bert_classifier()
    gm = lrc.transform(model, "attention.self.query:lora(r=4)", (ids,), {"attention_mask": kw["attention_mask"]})
    meta = lrc_meta(gm)
    rebuilt = rebuild_hf_model(meta, gm, "m.lrc")
    assert type(rebuilt) is tf.BertForSequenceClassification and rebuilt is not model
    have = {id(t) for t in gm.parameters()}
    params = dict(rebuilt.named_parameters())
    assert params and all(id(p) in have for p in params.values())  # no second copy of any weight
    assert rebuild_hf_model({**meta, "model_class": "os.system"}, gm, "m.lrc") is None
    with pytest.raises(LoadError, match="m.lrc: cannot rebuild BertForSequenceClassification"):
        rebuild_hf_model({**meta, "hf_config": {**meta["hf_config"], "hidden_size": -5}}, gm, "m.lrc")
    with torch.no_grad():  # the rebuilt model computes what the unmodified model computes (adapters at B=0)
        torch.testing.assert_close(rebuilt(ids, **kw).logits, model(ids, **kw).logits)


@pytest.mark.slow
def test_loaded_bf16_model_rebuilds_its_buffers_in_the_trained_dtype(tmp_path):
    """A model trained in bf16 (``model.to(torch.bfloat16)``: every floating buffer converted) loads with the same
    buffer dtypes and values, including buffers its graph does not use (RoPE's ``original_inv_freq``)."""
    from helpers.decoder import make_decoder

    model = make_decoder("llama").to(torch.bfloat16)
    gm = lrc.transform(model, "self_attn.q_proj:lora(r=4)", progress=False)
    lrc.save(gm, tmp_path / "m.lrc")
    rebuilt = lrc.load(tmp_path / "m.lrc").lrc_face.model
    want = dict(model.named_buffers())
    got = dict(rebuilt.named_buffers())
    assert set(got) == set(want) and "model.rotary_emb.original_inv_freq" in got
    for name, b in want.items():
        assert got[name].dtype == b.dtype, name
        torch.testing.assert_close(got[name], b, rtol=0, atol=0, msg=name)
