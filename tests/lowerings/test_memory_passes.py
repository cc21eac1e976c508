"""Training-memory lowerings (lowerings/lean_attention.py, lowerings/checkpoint_blocks.py) against the unrewritten graph.

Parity is exact (bitwise) under the same seed with dropout on: the lowerings run the same ops in the same
order and draw the same dropout masks. Saved-tensor bytes are counted with ``saved_tensors_hooks`` (unique
storages) and compared with what the shapes say the rewrite removes.
"""

from __future__ import annotations

import pytest
import torch
from helpers.common import example_ids, hidden, make_hf

import lowrank_compiler as lrc
from lowrank_compiler.errors import LrcError
from lowrank_compiler.lowerings.checkpoint_blocks import CheckpointedBlock, checkpoint_blocks
from lowrank_compiler.lowerings.lean_attention import LeanAttention, lean_attention
from lowrank_compiler.lowerings.lean_dropout import LeanDropout, lean_dropout
from lowrank_compiler.lowerings.lean_ffn import gelu_linear, lean_ffn

SPECS = {"bert": "attention.self.*:lora(r=4, alpha=8); attention.output.dense:lora(r=2)",
         "gpt2": "attn.c_attn:lora(r=4, alpha=8); attn.c_proj:lora(r=4)"}
B, T = 4, 16


@pytest.fixture(scope="module", params=["bert", "gpt2"])
def setup(request):
    ids = example_ids(B, T)
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    gm = lrc.transform(make_hf(request.param), SPECS[request.param], example_inputs=(ids,),
                       example_kwargs={"attention_mask": mask})
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.normal_(std=0.3)
    return request.param, gm, ids, mask


def _step(model, gm, ids, mask, seed=7):
    """Output and adapter gradients of one train-mode forward/backward under ``seed``."""
    model.train()
    torch.manual_seed(seed)
    out = hidden(model(ids, attention_mask=mask))
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad}
    gm.zero_grad(set_to_none=True)
    return out.detach(), grads


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert a[1].keys() == b[1].keys() and a[1]
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=0, atol=0)


def _saved_bytes(model, ids, mask) -> int:
    """Bytes of the distinct activation storages (not weights) autograd keeps after one train-mode forward."""
    sizes: dict[int, int] = {}
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            sizes[s.data_ptr()] = max(sizes.get(s.data_ptr(), 0), s.nbytes())
        return t

    model.train()
    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden(model(ids, attention_mask=mask))
    return sum(sizes.values())


@pytest.mark.parametrize("opts", [dict(attention="recompute", dropout=False), dict(attention="probs", mask="rng"),
                                  dict(attention=None, dropout=False, checkpoint=True),
                                  dict(ffn=True, checkpoint=True)])
def test_lowering_equals_the_unrewritten_graph_with_dropout(setup, opts):
    kind, gm, ids, mask = setup
    ref = _step(gm, gm, ids, mask)
    low = lrc.lower(gm, "memory", **opts)
    assert low is not gm
    count = [sum(isinstance(m, c) for m in low.modules()) for c in (LeanAttention, LeanDropout, CheckpointedBlock)]
    count.append(sum(n.target is gelu_linear for m in low.modules() if isinstance(m, torch.fx.GraphModule)
                     for n in m.graph.nodes))
    assert count == [2 if opts.get("attention", "recompute") else 0, 5 if opts.get("dropout", True) else 0,
                     2 if opts.get("checkpoint") else 0, 2 if opts.get("ffn") and kind == "bert" else 0]  # gpt2: gelu_new
    _assert_same(_step(low, gm, ids, mask), ref)
    gm.eval()
    low.eval()
    with torch.no_grad():  # eval / inference: plain SDPA, blocks run directly
        torch.testing.assert_close(hidden(low(ids, attention_mask=mask)), hidden(gm(ids, attention_mask=mask)),
                                   rtol=0, atol=0)


def test_saved_bytes_drop_by_what_the_shapes_say(setup):
    """Per layer autograd keeps softmax P, the dropout noise and P·noise: 3 float (B, H, T, T) maps. The
    rewrite keeps a 1-byte mask instead (recompute), or P and the mask (probs); q, k replace q·s, kᵀ·s."""
    kind, gm, ids, mask = setup
    cfg = gm.config
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    tt = B * heads * T * T
    base = _saved_bytes(gm, ids, mask)
    attn_mask_bytes = B * T * T  # the bool (B, 1, T, T) attention mask, saved once (shared by the layers)
    recompute = _saved_bytes(lean_attention(gm, recompute=True).gm, ids, mask)
    assert base - recompute == layers * (3 * tt * 4 - tt) - attn_mask_bytes
    probs = _saved_bytes(lean_attention(gm, recompute=False).gm, ids, mask)
    assert base - probs == layers * (2 * tt * 4 - tt)
    # hidden dropouts after a site that needs grad (2 per layer; not the embeddings'): 4-byte noise -> 1-byte mask
    assert base - _saved_bytes(lean_dropout(gm).gm, ids, mask) == layers * 2 * B * T * cfg.hidden_size * 3
    if kind == "bert":  # gelu(frozen intermediate.dense) keeps its (B, T, d) input, not the (B, T, d_ff) output
        ffn = _saved_bytes(lean_ffn(gm).gm, ids, mask)
        assert base - ffn == layers * B * T * (cfg.intermediate_size - cfg.hidden_size) * 4
    ckpt = checkpoint_blocks(gm).gm
    # a checkpointed block keeps nothing: at least the maps and the LayerNorm inputs (B, T, d) of every layer go
    assert _saved_bytes(ckpt, ids, mask) <= base - layers * (3 * tt * 4 + 2 * B * T * cfg.hidden_size * 4)


def test_gm_still_trains_merges_and_exports(setup, tmp_path):
    kind, gm, ids, mask = setup
    low = lrc.lower(gm, "memory", checkpoint=True)
    before = {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}
    opt = lrc.optimizer(gm, torch.optim.SGD, lr=0.1)
    _step(low, gm, ids, mask)
    low.train()
    hidden(low(ids, attention_mask=mask)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    assert any(not torch.equal(p, before[n]) for n, p in gm.named_parameters() if p.requires_grad)
    gm.eval()
    low.eval()
    with torch.no_grad():
        out = hidden(gm(ids, attention_mask=mask))
        torch.testing.assert_close(hidden(low(ids, attention_mask=mask)), out, rtol=0, atol=0)  # trained gm
        torch.testing.assert_close(hidden(lrc.merge(gm)(ids, attention_mask=mask)), out, rtol=1e-4, atol=1e-5)
    lrc.export(gm, tmp_path / "peft", format="peft")
    assert (tmp_path / "peft" / "adapter_model.safetensors").exists()
    with torch.no_grad():  # restore the fixture's weights for the other tests
        for n, p in gm.named_parameters():
            if n in before:
                p.copy_(before[n])


def test_without_dropout_attention_there_is_nothing_to_lower():
    llama = lrc.transform(make_hf("llama"), "self_attn.*:lora(r=4, alpha=8)", example_inputs=(example_ids(B, T),))
    res = lean_attention(llama)  # attention_dropout=0: SDPA keeps its fused CPU kernel, nothing to save
    assert not res.modified and res.gm is llama


def test_bad_options_are_refused(setup):
    gm = setup[1]
    with pytest.raises(LrcError, match="'bool', 'rng'"):
        lrc.lower(gm, "memory", mask="bits")
    with pytest.raises(LrcError, match="'recompute', 'probs', None"):
        lrc.lower(gm, "memory", attention="all")


def test_no_activation_is_saved_twice(setup):
    """The base GEMM of a site (frozen W) keeps no input; the adapter's A-GEMM keeps x, once per input node
    (q/k/v share one), and no other saved storage holds a copy of any saved activation."""
    kind, gm, ids, mask = setup
    weights = {t.untyped_storage().data_ptr() for t in [*gm.parameters(), *gm.buffers()]}
    saved: dict[int, torch.Tensor] = {}
    inputs: set[int] = set()

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    hooks = [a.register_forward_pre_hook(lambda m, args: inputs.add(args[0].untyped_storage().data_ptr()))
             for a in lrc.adapters(gm).values()]
    gm.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden(gm(ids, attention_mask=mask))
    finally:
        for h in hooks:
            h.remove()
    assert len(inputs) == 2 * gm.config.num_hidden_layers  # q/k/v (or c_attn) input and the out-projection's
    assert inputs <= saved.keys()  # kept once, by the A-GEMM
    flat = [t.detach().reshape(-1) for t in saved.values()]
    for i, a in enumerate(flat):
        for b in flat[i + 1:]:
            assert not (a.numel() == b.numel() > 64 and a.dtype == b.dtype and torch.equal(a, b)), "stored twice"


@pytest.mark.parametrize("case", ["bool", "float", "none", "causal"])
def test_lean_attention_module_equals_sdpa_bitwise(case):
    """LeanAttention vs torch's own SDPA with dropout (the math path), masks of every kind, both save modes."""

    class Sdpa(torch.nn.Module):  # stands in for the mode pass's module (recognised by name there)
        p = 0.25

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 12, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = {"bool": torch.rand(2, 1, 12, 12, generator=g) > 0.3, "float": torch.randn(2, 3, 12, 12, generator=g),
            "none": None, "causal": None}[case]
    kw = dict(attn_mask=mask, is_causal=case == "causal", scale=0.3 if case == "float" else None)
    d_out = torch.randn(2, 3, 12, 8, generator=g)
    torch.manual_seed(4)
    ref_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.25, **kw)
    ref = (ref_out, *torch.autograd.grad(ref_out, (q, k, v), d_out))
    for recompute, how in ((True, "bool"), (False, "rng")):
        torch.manual_seed(4)
        out = LeanAttention(Sdpa().train(), recompute, how)(q, k, v, **kw)
        assert out.grad_fn is not None and "_LeanSDPA" in type(out.grad_fn).__name__
        for a, b in zip((out, *torch.autograd.grad(out, (q, k, v), d_out)), ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
