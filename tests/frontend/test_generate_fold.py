"""Issue 23: ``generate``'s fold. Sites whose adapter has an exact merge run ``linear(x, W + s·B A, b)`` over a
copy made once per call: logits equal the unfolded path's within fp32 rounding, tokens equal PEFT's, nothing of the
model is left modified, a bound and opt-outs decide which sites fold, and a bf16 base folds in fp32, rounded once."""

from __future__ import annotations

import copy

import pytest
import torch

import lowrank_compiler as lrc
from lowrank_compiler.frontend.eager import FOLD_MIN_TOKENS, EagerSite, eager_adapters, fold_default
from tests.helpers.decoder import SPECS, batch, make_decoder

KW = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)


def _transformed(kind: str = "llama", spec: str | None = None, std: float = 0.5, dtype=torch.float32):
    """(untouched base copy, transformed model with random B of ``std``: adapters that change the tokens)."""
    model = make_decoder(kind).to(dtype)
    base = copy.deepcopy(model)
    gm = lrc.transform(model, spec or SPECS[kind][0])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in gm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return base, gm


def _folded_sites(gm, **kw) -> dict[str, bool]:
    """``{site: folded?}`` as ``generate`` would set them up."""
    with torch.no_grad(), eager_adapters(gm, gm.lrc_face.model, **kw) as model:
        return {n: m.folded is not None for n, m in model.named_modules() if isinstance(m, EagerSite)}


def _logits(out) -> torch.Tensor:
    return torch.stack(out.logits).float()


@pytest.mark.parametrize("kind", [pytest.param("llama", marks=pytest.mark.slow), "gpt2"])  # gpt2: Conv1D sites (the fold is in d_out x d_in layout)
def test_folded_generate_equals_unfolded_and_peft(kind, tmp_path):
    from peft import PeftModel

    base, gm = _transformed(kind)
    assert all(_folded_sites(gm).values())
    b = batch(4, 12)
    folded, unfolded = gm.generate(**b, **KW, lrc_fold=True), gm.generate(**b, **KW, lrc_fold=False)
    ref = _logits(unfolded)
    tol = 64 * torch.finfo(torch.float32).eps * ref.abs().max().item()  # a few roundings per layer, fp32
    assert (_logits(folded) - ref).abs().max().item() <= tol
    assert torch.equal(folded.sequences, unfolded.sequences)
    short = gm.generate(**b, **KW)  # 6 new tokens: below FOLD_MIN_TOKENS, the default runs unfolded
    assert torch.equal(_logits(short), ref) and not torch.equal(_logits(folded), ref)
    assert (_logits(base.generate(**b, **KW)) - ref).abs().max().item() > 1e3 * tol  # the adapters act
    lrc.export(gm, tmp_path / "peft", format="peft")
    peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    assert torch.equal(peft.generate(**b, **KW).sequences, folded.sequences)


@pytest.mark.slow  # 13-23 s at load 2.5 on 2 cores (each transform traces)
def test_fold_leaves_the_model_unmodified_and_training_works():
    base, gm = _transformed()
    model = gm.lrc_face.model
    tensors = {n: (t, t.detach().clone()) for n, t in [*gm.named_parameters(), *model.named_parameters()]}
    modules = {n: type(m) for n, m in model.named_modules()}
    gm.generate(**batch(2, 10), max_new_tokens=4, do_sample=False, lrc_fold=True)
    after = dict([*gm.named_parameters(), *model.named_parameters()])
    assert after.keys() == tensors.keys()
    assert all(after[n] is t and torch.equal(t, copy_) for n, (t, copy_) in tensors.items())  # same objects, bits
    assert {n: type(m) for n, m in model.named_modules()} == modules  # the swap is undone
    gm.train()
    b = batch(2, 10)
    loss = gm(**b, labels=b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)).loss
    loss.backward()
    grads = {n: p.grad for n, p in gm.named_parameters() if "lora_" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())  # every adapter learns
    assert all(p.grad is None for n, p in gm.named_parameters() if "lora_" not in n)  # the base stays frozen


@pytest.mark.slow  # 13-23 s at load 2.5 on 2 cores (each transform traces)
def test_fold_bound_and_opt_outs(monkeypatch):
    _, gm = _transformed()
    sizes = {s: gm.lrc_face.model.get_submodule(s).weight.numel() * 4 for s in _folded_sites(gm)}
    monkeypatch.setenv("LRC_GENERATE_FOLD_MB", str(min(sizes.values()) * 2.5 / (1 << 20)))
    got = _folded_sites(gm)  # smallest first, while the copies fit
    assert sum(got.values()) == 2 and all(sizes[s] == min(sizes.values()) for s, f in got.items() if f)
    assert all(_folded_sites(gm, fold=True).values())  # True: every site, whatever the bound
    monkeypatch.setenv("LRC_GENERATE_FOLD_MB", "0")
    assert not any(_folded_sites(gm).values())
    monkeypatch.delenv("LRC_GENERATE_FOLD_MB")
    assert not any(_folded_sites(gm, fold=False).values())
    site, ad = next(iter(lrc.adapters(gm).items()))
    handle = ad.register_forward_hook(lambda *a: None)  # a hook must still see its calls
    assert not _folded_sites(gm)[site]
    handle.remove()
    _, dropping = _transformed(spec="self_attn.*:lora(r=4, dropout=0.1)")
    assert not any(_folded_sites(dropping.train()).values())  # active dropout is not a fixed weight
    assert all(_folded_sites(dropping.eval()).values())
    _, dora = _transformed(spec="self_attn.*:dora(r=4)")
    assert not any(_folded_sites(dora).values())  # its own forward: no inference weight, the per-site path


@pytest.mark.slow  # 13-23 s at load 2.5 on 2 cores (each transform traces)
def test_bf16_folds_in_fp32_and_keeps_the_fp32_tokens():
    """bf16 base, fp32 adapter masters: W' = (W + s·B A in fp32) rounded once; generate stays within bf16 rounding
    of the fp32 model's logits and gives its tokens on this prompt (the unfolded bf16 path flips a near-tie on it)."""
    _, gm = _transformed(std=0.1)
    _, gb = _transformed(std=0.1, dtype=torch.bfloat16)
    with torch.no_grad():
        for n, p in gb.named_parameters():
            if "lora_" in n:
                assert p.dtype == torch.float32
                p.copy_(dict(gm.named_parameters())[n])
    assert all(_folded_sites(gb).values())
    b = batch(2, 10, seed=1)
    want = gm.generate(**b, **KW)
    folded = gb.generate(**b, **KW, lrc_fold=True)
    ref = _logits(want)
    assert (_logits(folded) - ref).abs().max().item() <= 2 * torch.finfo(torch.bfloat16).eps * ref.abs().max().item()
    assert torch.equal(folded.sequences, want.sequences)


def test_fold_default_by_new_tokens():
    """The default folds only a call that makes at least FOLD_MIN_TOKENS new tokens (the fold costs a few steps)."""
    from transformers import GenerationConfig

    class M(torch.nn.Module):
        generation_config = GenerationConfig()  # HF's default: max_length 20

    ids = torch.zeros(1, 12, dtype=torch.long)
    n = FOLD_MIN_TOKENS
    assert fold_default(M(), (ids,), {}) is False  # 20 - 12 = 8 new tokens
    assert fold_default(M(), (), {"input_ids": ids, "max_length": 12 + n}) is None
    assert fold_default(M(), (ids,), {"max_new_tokens": n - 1}) is False
    assert fold_default(M(), (ids,), {"max_new_tokens": n}) is None
    assert fold_default(M(), (ids,), {"generation_config": GenerationConfig(max_new_tokens=4 * n)}) is None
