"""HF directories keep their head (config.architectures), and the merged HF layout export (``--format hf``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowrank_compiler as lrc
from lowrank_compiler import cli
from lowrank_compiler.errors import ExportError, LoadError

tf = pytest.importorskip("transformers")


def bert_cfg(**kw):
    return tf.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                         vocab_size=100, max_position_embeddings=64, **kw)


def save_dir(model, path) -> str:
    model.save_pretrained(str(path))
    return str(path)


def feeds(seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 100, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[0, -3:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def cls_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    return save_dir(tf.BertForSequenceClassification(bert_cfg(num_labels=3)).eval(),
                    tmp_path_factory.mktemp("hf") / "cls")


def test_dir_loads_with_its_head(cls_dir):
    gm = cli.load_model(cls_dir)
    ref = tf.AutoModelForSequenceClassification.from_pretrained(cls_dir).eval()
    ids, mask = feeds()
    with torch.no_grad():
        got, want = gm(ids, mask).logits, ref(input_ids=ids, attention_mask=mask).logits
    assert got.shape == (2, 3)
    assert (got - want).abs().max() < 1e-5


def test_causal_lm_dir_keeps_lm_head(tmp_path):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=32,
                         intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    d = save_dir(tf.LlamaForCausalLM(cfg).eval(), tmp_path / "llama")
    gm = cli.load_model(d)
    ids, mask = feeds()
    ref = tf.AutoModelForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        got = gm(ids, mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    assert got.shape == (2, 16, 100) and (got - want).abs().max() < 1e-4


def test_unknown_architecture_is_a_load_error(tmp_path):
    torch.manual_seed(0)
    d = save_dir(tf.BertModel(bert_cfg()).eval(), tmp_path / "b")
    cfg = tf.AutoConfig.from_pretrained(d)
    cfg.architectures = ["BertForTimeTravel"]
    cfg.save_pretrained(d)
    with pytest.raises(LoadError, match="BertForTimeTravel"):
        cli.load_model(d)


def test_classifier_dir_to_onnx_gives_torch_logits_in_ort(cls_dir, tmp_path):
    from lowrank_compiler.backends.onnx.export import session

    out = tmp_path / "cls.onnx"
    assert cli.main(["export", cls_dir, "--merge", "-o", str(out)]) == 0
    sess = session(out, providers="cpu")
    assert "logits" in sess.output_names
    ids, mask = feeds(seq=11)  # a different sequence length than the trace's
    got = sess({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, output_names=["logits"])[0]
    ref = tf.AutoModelForSequenceClassification.from_pretrained(cls_dir).eval()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits.numpy()
    assert got.shape == (2, 3) and np.abs(got - want).max() < 1e-4


def _trained(cls_dir):
    gm = lrc.transform(cli.load_model(cls_dir), "attention.self.*:lora(r=4, alpha=8); classifier:full")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in gm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return gm


def test_hf_layout_loads_strictly_with_the_same_logits(cls_dir, tmp_path):
    gm = _trained(cls_dir)
    lrc.save(gm, tmp_path / "m.lrc")  # the manifest keeps the config: export works from the file too
    out = tmp_path / "merged"
    assert cli.main(["export", str(tmp_path / "m.lrc"), "--format", "hf", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    back, info = tf.AutoModelForSequenceClassification.from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    ref = tf.AutoModelForSequenceClassification.from_pretrained(cls_dir).eval()
    ids, mask = feeds()
    with torch.no_grad():
        got = back.eval()(input_ids=ids, attention_mask=mask).logits
        want = gm(ids, mask).logits
        base = ref(input_ids=ids, attention_mask=mask).logits
    assert (got - want).abs().max() < 1e-5
    assert (got - base).abs().max() > 1e-3  # the adapters and the trained head are in the weights
    from safetensors.torch import load_file

    assert set(load_file(out / "model.safetensors")) == set(ref.state_dict())  # no extra buffers


def test_hf_layout_tied_lm_head(tmp_path):
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64)
    d = save_dir(tf.GPT2LMHeadModel(cfg).eval(), tmp_path / "gpt2")
    gm = lrc.transform(cli.load_model(d), "attn.c_attn:lora(r=4)")
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.normal_(generator=torch.Generator().manual_seed(0))
    lrc.export(gm, tmp_path / "out", format="hf")
    back, info = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask = feeds()
    with torch.no_grad():
        assert (back.eval()(input_ids=ids, attention_mask=mask).logits - gm(ids, mask).logits).abs().max() < 1e-4


def test_hf_layout_needs_a_transformers_model(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    gm = lrc.transform(model, "0:lora(r=2)", (torch.randn(2, 4),))
    with pytest.raises(ExportError, match="transformers config"):
        lrc.export(gm, tmp_path / "x", format="hf")
    assert not (tmp_path / "x").exists()
