"""Decoder LMs end to end: stock configs transform with no flags, generate with a KV cache like PEFT, ONNX."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.decoder import SPECS, batch, make_decoder, trained

import lowrank_compiler as lrc

NEW = 16


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def lm(request, tmp_path_factory):
    """(kind, transformed model after 20 steps, PEFT model holding the same adapters, prompt batch)."""
    from peft import PeftModel

    kind = request.param
    gm, base = trained(kind, steps=20)
    d = tmp_path_factory.mktemp(f"peft_{kind}")
    lrc.export(gm, d, format="peft")
    pm = PeftModel.from_pretrained(base, d).eval()
    return kind, gm, pm, batch(seed=99)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "mistral"])
def test_stock_config_transforms_without_flags(kind):
    model = make_decoder(kind)
    assert model.config.use_cache is True  # the default, left alone
    gm = lrc.transform(model, SPECS[kind][0])  # no example inputs, no use_cache=False
    b = batch()
    with torch.no_grad():
        out, ref = gm(**b), model(**b)
    assert (out.logits - ref.logits).abs().max() < 1e-5  # adapters start at zero: the base model
    assert out.cache.get_seq_length() == b["input_ids"].shape[1]
    assert gm.config is model.config and gm.generation_config is model.generation_config
    assert gm.device == torch.device("cpu") and gm.dtype == torch.float32


@pytest.mark.slow
def test_generate_matches_peft_and_merged(lm):
    kind, gm, pm, b = lm
    assert any(float(m.lora_B.abs().max()) > 0 for m in lrc.adapters(gm).values())  # training moved them
    ours = gm.generate(**b, max_new_tokens=NEW, do_sample=False)
    ref = pm.generate(**b, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(ours, ref), kind
    assert ours.shape[1] <= b["input_ids"].shape[1] + NEW
    lrc.merge(gm, keep_adapters=True)
    try:
        assert torch.equal(gm.generate(**b, max_new_tokens=NEW, do_sample=False), ref)
    finally:
        lrc.unmerge(gm)
    assert torch.equal(lrc.merge(gm).generate(**b, max_new_tokens=NEW, do_sample=False), ref)
    base_tokens = pm.get_base_model()
    with pm.disable_adapter():
        plain = base_tokens.generate(**b, max_new_tokens=NEW, do_sample=False)
    assert not torch.equal(plain, ref)  # the adapters change what is generated: the comparison proves something


@pytest.mark.slow
def test_sampling_and_eos_match_peft(lm):
    kind, gm, pm, b = lm
    torch.manual_seed(7)
    ours = gm.generate(**b, max_new_tokens=NEW, do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(7)
    ref = pm.generate(**b, max_new_tokens=NEW, do_sample=True, top_k=0, temperature=1.0)
    assert torch.equal(ours, ref), kind
    greedy = pm.generate(**b, max_new_tokens=NEW, do_sample=False)
    eos = int(greedy[0, b["input_ids"].shape[1] + 2])  # the third new token of row 0 becomes the stop token
    ours = gm.generate(**b, max_new_tokens=NEW, do_sample=False, eos_token_id=eos)
    ref = pm.generate(**b, max_new_tokens=NEW, do_sample=False, eos_token_id=eos)
    assert torch.equal(ours, ref)
    assert ours.shape[1] <= greedy.shape[1]


def test_load_peft_on_stock_decoder(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = make_decoder("llama")
    base = copy.deepcopy(model)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=SPECS["llama"][1]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(tmp_path)
    gm = lrc.load_peft(base, tmp_path)  # no example inputs
    pm.eval()
    b = batch(seed=3)
    with torch.no_grad():
        assert (gm(**b).logits - pm(**b).logits).abs().max() < 1e-5
    assert torch.equal(gm.generate(**b, max_new_tokens=8, do_sample=False),
                       pm.generate(**b, max_new_tokens=8, do_sample=False))


@pytest.mark.slow
def test_onnx_generate_matches_torch(lm, tmp_path):
    """ORT greedy loop over the KV-cache decode graph: two adapters switched per run, and merged weights."""
    import numpy as np

    from lowrank_compiler.backends.onnx.export import session
    from lowrank_compiler.backends.onnx.generate import ort_generate

    kind, gm, _, b = lm
    eos = gm.generation_config.eos_token_id
    ref = gm.generate(**b, max_new_tokens=NEW, do_sample=False)  # == PEFT's (test above)
    other = copy.deepcopy(gm)
    with torch.no_grad():
        for m in lrc.adapters(other).values():
            m.lora_B.mul_(-1.5)
    ref2 = other.generate(**b, max_new_tokens=NEW, do_sample=False)
    assert not torch.equal(ref, ref2)
    lrc.save_adapters(other, tmp_path / "two.safetensors")
    rep = lrc.export(gm, tmp_path / "sep.onnx", adapter_name="one", extra_adapters=[str(tmp_path / "two.safetensors")])
    assert rep["max_abs_diff"] < 1e-4 and "past.0.key" in rep["inputs"] and "present.0.key" in rep["outputs"]
    sess = session(tmp_path / "sep.onnx", providers="cpu")
    for name, want in (("one", ref), ("two", ref2), ("one", ref)):
        got = ort_generate(sess, b["input_ids"], b["attention_mask"], max_new_tokens=NEW, eos_token_id=eos,
                           adapter=tmp_path / f"{name}.onnx_adapter")
        assert np.array_equal(got, want.numpy()), (kind, name)
    lrc.export(gm, tmp_path / "merged.onnx", merge=True)
    sess = session(tmp_path / "merged.onnx", providers="cpu")
    assert sess.get_outputs()[0].shape[-1] == gm.config.vocab_size  # lm_head kept (GPT-2: tied to wte)
    got = ort_generate(sess, b["input_ids"], b["attention_mask"], max_new_tokens=NEW, eos_token_id=eos)
    assert np.array_equal(got, ref.numpy())


def test_onnx_external_data_and_cli_generate(tmp_path, capsys):
    """External data forced on a small model; `lrc run --generate` prints the torch model's greedy tokens."""
    import numpy as np

    from lowrank_compiler.backends.onnx.generate import export_decoder_onnx
    from lowrank_compiler.cli import main

    gm = lrc.transform(make_decoder("llama"), SPECS["llama"][0])
    with torch.no_grad():
        for m in lrc.adapters(gm).values():
            m.lora_B.normal_(0, 0.3)
    rep = export_decoder_onnx(gm, tmp_path / "m.onnx", merge=False, adapters_dir=tmp_path, adapter_name="a",
                              external_data=True)
    import onnx

    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    external = {i.name for i in proto.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
    assert rep["external_data"] and any("embed_tokens" in n for n in external)
    assert (tmp_path / "m.onnx.data").stat().st_size >= sum(p.numel() * 4 for p in gm.parameters()) // 2
    assert rep["max_abs_diff"] < 1e-4
    ids = batch(n=2, seed=5)["input_ids"][:, -6:]
    np.save(tmp_path / "ids.npy", ids.numpy())
    want = gm.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=None)[:, 6:]
    capsys.readouterr()
    assert main(["run", str(tmp_path / "m.onnx"), "--generate", "6", "--input", f"input_ids={tmp_path / 'ids.npy'}",
                 "--adapter", str(tmp_path / "a.onnx_adapter"), "--providers", "cpu"]) == 0
    out = capsys.readouterr().out.split(str(tmp_path / "a.onnx_adapter"))[1].splitlines()[1:3]
    assert [[int(t) for t in line.split()] for line in out] == want.tolist()


def test_tied_lm_head_refused_with_reason_but_exports():
    model = make_decoder("gpt2")
    with pytest.raises(lrc.errors.SpecError, match="(?i)tied"):
        lrc.transform(model, "lm_head:lora(r=2)")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dora(r=4)", "vera(r=8)", "lora_fa(r=4)"])
def test_every_method_generates_through_the_same_path(method):
    """Each method's adapters run in the decode graphs: unmerged tokens == merged tokens != base tokens."""
    model = make_decoder("llama")
    base = copy.deepcopy(model)
    gm = lrc.transform(model, f"self_attn.*:{method}; mlp.*:{method}")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lrc.adapters(gm).values():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
    b = batch(seed=11)
    ours = gm.generate(**b, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, lrc.merge(gm).generate(**b, max_new_tokens=8, do_sample=False))
    assert not torch.equal(ours, base.generate(**b, max_new_tokens=8, do_sample=False))
