"""torch.compile lowering: same outputs and training steps as eager, no graph breaks from adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.export import transformed
from helpers.mlp import UpDown as MLP

import lowrank_compiler as lrc
from lowrank_compiler.backends.torch_compile import graph_breaks
from lowrank_compiler.errors import ExportError


def _mlp():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 8)
    gm = lrc.transform(MLP(), "up:lora(r=2); down:lora(r=2)", (x,))
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.normal_(std=0.3)
    return gm, x


def _train(step_model, params, x, steps=2):
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = step_model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_no_graph_breaks_small():
    gm, x = _mlp()
    assert graph_breaks(gm, x) == []


def test_compiled_training_step_equals_eager():
    gm, x = _mlp()
    ref = copy.deepcopy(gm)
    fast = lrc.compile(gm, backend="aot_eager")  # AOTAutograd traces forward and backward
    got = _train(fast, [p for p in gm.parameters() if p.requires_grad], x)
    want = _train(ref, [p for p in ref.parameters() if p.requires_grad], x)
    assert got == pytest.approx(want, abs=1e-5)
    for (n, p), (_, q) in zip(gm.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=n)
    assert not torch.equal(gm.get_submodule("up.adapter").lora_B, _mlp()[0].get_submodule("up.adapter").lora_B)


def test_compiled_hf_dispatcher_compiles_once():
    gm, ids, mask = transformed("bert")
    torch._dynamo.reset()  # entries of earlier tests' (deallocated) graphs would count as recompiles
    fast = lrc.compile(gm, backend="eager")  # dynamo only: the dispatcher's first call must change no state
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            fast(ids, attention_mask=mask)


def test_compiled_merged_and_unmerged_inference_equal_eager():
    gm, x = _mlp()
    gm.eval()
    with torch.no_grad():
        ref = gm(x)
        torch.testing.assert_close(lrc.compile(gm, backend="aot_eager")(x), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(lrc.compile(gm, merge=True, backend="aot_eager")(x), ref, atol=1e-5, rtol=0)


def test_compile_errors():
    with pytest.raises(ExportError, match="unknown torch.compile backend 'nope'"):
        lrc.compile(_mlp()[0], backend="nope")
    with pytest.raises(ExportError, match="needs a GraphModule"):
        lrc.compile("model.pt")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_no_graph_breaks_hf(kind):
    gm, ids, mask = transformed(kind)
    assert graph_breaks(gm, ids, mask) == []
    gm.train()
    assert graph_breaks(gm, ids, mask) == []


@pytest.mark.slow
def test_inductor_merged_inference_and_training_hf():
    gm, ids, mask = transformed("bert")
    gm.eval()
    with torch.no_grad():
        ref = gm(ids, attention_mask=mask).last_hidden_state
        out = lrc.compile(gm, merge=True)(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    fast = lrc.compile(gm)  # unmerged adapters, training: gradients equal eager
    loss = fast(ids, attention_mask=mask).last_hidden_state.pow(2).mean()
    loss.backward()
    got = {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad}
    gm.zero_grad()
    gm(ids, attention_mask=mask).last_hidden_state.pow(2).mean().backward()
    for n, p in gm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.slow
def test_default_compile_is_exact_in_train_mode():
    """lrc.compile(gm) as a user calls it (inductor, train mode, BERT's dropout 0.1 on): a seeded step gives the
    eager model's loss and gradients (same dropout draws); inductor's own random stream does not."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=64)
    gm = lrc.transform(tf.BertModel(cfg), "attention.self.*:lora(r=4)").train()
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    target = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(2))

    def step(model):
        torch.manual_seed(7)
        loss = (model(input_ids=ids).last_hidden_state - target).pow(2).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad}
        gm.zero_grad()
        return loss.item(), grads

    torch._dynamo.reset()
    want, want_g = step(gm)
    got, got_g = step(lrc.compile(gm))
    assert got == pytest.approx(want, rel=1e-4)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], atol=1e-5, rtol=1e-3, msg=n)
    torch._dynamo.reset()
    other, _ = step(lrc.compile(gm, exact_dropout=False))
    assert other != pytest.approx(want, rel=1e-4)  # another draw: the test can tell the two apart


def test_default_compiles_the_exact_lowerings():
    """lrc.compile(gm) runs the lowerings that keep torch's random stream (LoRA kernel, oneDNN linears), not the
    dropout lowering; lower=False compiles the graph as transformed."""
    from lowrank_compiler.lowerings.kernels import LoweredLoRA

    gm, x = _mlp()
    default, plain = lrc.compile(gm, backend="aot_eager"), lrc.compile(gm, backend="aot_eager", lower=False)
    for fast, lowered in ((default, True), (plain, False)):
        inner = fast._orig_mod if hasattr(fast, "_orig_mod") else fast
        assert any(isinstance(m, LoweredLoRA) for m in inner.modules()) is lowered


@pytest.mark.slow
def test_default_compile_keeps_gms_graph_and_runs_the_lowered_one():
    """On an HF model the compiled object holds gm's own graph (generate and eager_ready read it) and runs the
    lowered graph (LoRA kernel, oneDNN linears) for the call; eval outputs equal gm's."""
    from lowrank_compiler.lowerings.kernels import LoweredLoRA, linear

    hf, ids, mask = transformed("bert")
    fast = lrc.compile(hf, backend="aot_eager")
    assert str(fast.graph) == str(hf.graph)  # gm's graph: generate and eager_ready read it
    run = fast.lrc_face.run_primary._orig_mod
    assert any(isinstance(m, LoweredLoRA) for m in run.modules()) and any(n.target is linear for n in run.graph.nodes)
    hf.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, attention_mask=mask).last_hidden_state,
                                   hf(ids, attention_mask=mask).last_hidden_state, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_llama_trains_with_labels_and_returns_its_cache():
    """A stock Llama (LoRA on attention and MLP, no example inputs) compiled with defaults takes a ``labels=`` call
    whose output holds a DynamicCache: the pytree convention runs around the compiled graph (dynamo 2.13 cannot
    rebuild transformers' cache), loss and logits equal the transformed model's, and gradients reach the adapters."""
    from helpers.decoder import batch, make_decoder
    from transformers import DynamicCache

    torch.manual_seed(0)
    gm = lrc.transform(make_decoder("llama"), "self_attn.*:lora(r=4); mlp.*:lora(r=4)", progress=False)
    for ad in lrc.adapters(gm).values():
        with torch.no_grad():
            ad.lora_B.normal_(std=0.2)
    gm.eval()
    fast = lrc.compile(gm, backend="aot_eager")
    b = batch(2, 8)
    got, want = fast(**b, labels=b["input_ids"]), gm(**b, labels=b["input_ids"])
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    assert isinstance(got.past_key_values, DynamicCache)
    got.loss.backward()
    assert all(ad.lora_A.grad is not None and ad.lora_A.grad.abs().sum() > 0 for ad in lrc.adapters(gm).values())
