"""Each pass: one case that rewrites (modified=True), one already in target form (modified=False)."""

from __future__ import annotations

import torch
from helpers.common import ATTN_SPEC, example_ids, hidden, make_hf
from torch import fx, nn

import lowrank_compiler as lrc
from lowrank_compiler.frontend.trace import trace
from lowrank_compiler.ir import META_KEY, AdapterMark, SiteMark, adapter_nodes
from lowrank_compiler.methods.base import SiteInfo
from lowrank_compiler.methods.lora import LoRA
from lowrank_compiler.passes.insert import insert
from lowrank_compiler.passes.match import match
from lowrank_compiler.passes.merge import merge
from lowrank_compiler.passes.mode import make_mode_switchable
from lowrank_compiler.passes.set_merged import set_merged
from lowrank_compiler.passes.strip import strip
from lowrank_compiler.spec.language import parse_spec
from lowrank_compiler.spec.sites import find_sites


def _bert_graph():
    return trace(make_hf("bert"), (example_ids(),))


def test_mode_pass_idempotent():
    gm = _bert_graph()  # trace already ran the mode pass
    assert not any(n.target is torch.ops.aten.dropout.default for n in gm.graph.nodes)
    assert make_mode_switchable(gm).modified is False


def test_match_then_insert_counts_and_marks():
    gm = _bert_graph()
    spec = parse_spec(ATTN_SPEC["bert"])
    res = match(gm, spec)
    assert res.modified
    marks = [n.meta[META_KEY] for n in gm.graph.nodes if isinstance(n.meta.get(META_KEY), SiteMark)]
    assert len(marks) == 6 and {m.method for m in marks} == {"lora"}
    assert match(gm, spec).modified is False  # same marks again
    res = insert(gm)
    assert res.modified and len(adapter_nodes(gm)) == 6
    assert all(isinstance(n.meta[META_KEY], AdapterMark) for n in adapter_nodes(gm))
    assert insert(gm).modified is False  # nothing marked any more
    gm.graph.lint()
    # node.meta['val'] stays valid on rewritten nodes
    assert all("val" in n.meta for n in adapter_nodes(gm))


def test_merge_and_strip_passes():
    gm = lrc.transform(make_hf("bert"), ATTN_SPEC["bert"], example_inputs=(example_ids(),)).eval()
    ids = example_ids()
    base = hidden(strip(gm).gm(ids))
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.normal_()
    s = strip(gm)
    assert s.modified and not adapter_nodes(s.gm)
    assert torch.allclose(hidden(s.gm(ids)), base)  # adapters removed, weights not folded
    assert strip(s.gm).modified is False
    assert set_merged(gm, False).modified is False
    assert set_merged(gm, True).modified is True
    assert set_merged(gm, True).modified is False
    set_merged(gm, False)
    y = hidden(gm(ids))
    res = merge(gm)
    assert res.modified and not adapter_nodes(gm)
    assert (hidden(gm(ids)) - y).abs().max() <= 1e-5
    assert merge(gm).modified is False


def test_merge_oracle_hand_set_integers():
    """Three oracles: literal merged matrix, exact state-dict keys, strict load into nn.Linear."""
    lin = nn.Linear(3, 2, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]))
        lin.bias.copy_(torch.tensor([0.5, -0.5]))
    gm = lrc.transform(nn.Sequential(lin), "0:lora(r=1, alpha=2)")
    a = lrc.adapters(gm)["0"]
    assert a.scaling == 2.0
    with torch.no_grad():
        a.lora_A.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
        a.lora_B.copy_(torch.tensor([[1.0], [-1.0]]))
    merged = lrc.merge(gm)
    expected = torch.tensor([[3.0, 4.0, 8.0], [-2.0, -3.0, -6.0]])
    assert torch.equal(merged.get_parameter("0.weight"), expected)
    assert set(merged.state_dict()) == {"0.weight", "0.bias"}
    plain = nn.Linear(3, 2)
    plain.load_state_dict({k.split(".", 1)[1]: v for k, v in merged.state_dict().items()}, strict=True)
    x = torch.randn(4, 3)
    assert torch.allclose(plain(x), gm(x), atol=1e-6)


def test_sites_in_symbolic_and_conv1d_graphs():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4))  # x @ w: Conv1D layout
            self.lin = nn.Linear(6, 4)

        def forward(self, x):
            return x @ self.w + self.lin(x)

    gm = fx.symbolic_trace(M())
    sites = {s.name: s for s in find_sites(gm)}
    assert sites["w"].layout == "conv1d" and (sites["w"].d_in, sites["w"].d_out) == (6, 4)
    assert sites["lin"].layout == "linear" and (sites["lin"].d_in, sites["lin"].d_out) == (6, 4)
    gm2 = lrc.transform(M(), "w:lora(r=2); lin:lora(r=2)")
    x = torch.randn(3, 6)
    with torch.no_grad():
        for a in lrc.adapters(gm2).values():
            a.lora_B.normal_()
    assert (lrc.merge(gm2)(x) - gm2(x)).abs().max() <= 1e-5


def test_lora_method_contract():
    a = LoRA(SiteInfo("s", d_in=5, d_out=3), r=2, alpha=4.0, dropout=0.0, rslora=True)
    assert abs(a.scaling - 4 / 2 ** 0.5) < 1e-12
    w, b, x = torch.randn(3, 5), torch.randn(3), torch.randn(7, 5)
    with torch.no_grad():
        a.lora_B.normal_()
    ref = x @ w.T + b + a.scaling * x @ a.lora_A.T @ a.lora_B.T
    assert torch.allclose(a(x, w, b), ref, atol=1e-5)
    assert torch.allclose(a.merged_weight(w), w + a.scaling * a.lora_B @ a.lora_A, atol=1e-6)
    assert torch.allclose(a.unmerged_weight(a.merged_weight(w)), w, atol=1e-6)
