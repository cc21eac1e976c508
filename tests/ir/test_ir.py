"""ir.verify catches each invariant of docs/INVARIANTS.md when a graph breaks it on purpose, and the pass
manager keeps an error's type and attributes while naming the pass."""

from __future__ import annotations

import pytest
import torch
from helpers.common import TinyMLP
from torch import fx, nn

import lowrank_compiler as lrc
from lowrank_compiler import ir
from lowrank_compiler.ir import VerifyError
from lowrank_compiler.passes.manager import Pass, PassResult, Pipeline


@pytest.fixture
def gm():
    torch.manual_seed(0)
    return lrc.transform(TinyMLP().eval(), "up:lora(r=2); down:lora(r=2)", (torch.randn(2, 3, 8),)).eval()


def test_verify_accepts_a_transformed_graph(gm):
    ir.verify(gm)
    ir.verify(lrc.merge(gm))


def test_invariant_1_lint(gm):
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    node.args = (node,) + node.args[1:]  # a node that uses itself: lint fails
    with pytest.raises(VerifyError, match="invariant 1"):
        ir.verify(gm)


def test_invariant_1_recompiled(gm):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        gm.graph.call_function(torch.relu, (out.args[0],))  # graph edited, no recompile()
    with pytest.raises(VerifyError, match="recompiled"):
        ir.verify(gm)


def test_invariant_2_mark_on_wrong_module(gm):
    node = ir.adapter_nodes(gm)[0]
    gm.add_submodule("not_an_adapter", nn.Identity())
    node.target = "not_an_adapter"
    gm.recompile()
    with pytest.raises(VerifyError, match="invariant 2"):
        ir.verify(gm)


def test_invariant_2_orphan_adapter(gm):
    node = ir.adapter_nodes(gm)[0]
    ir.adapter_to_linear(gm.graph, node)  # node gone, its adapter module left behind
    gm.recompile()
    with pytest.raises(VerifyError, match="not called"):
        ir.verify(gm)


def test_invariant_3_weight_argument(gm):
    up = ir.adapter_nodes(gm)[0]
    with gm.graph.inserting_before(up):
        other = gm.graph.get_attr("down.weight")
    up.args = (up.args[0], other, up.args[2])  # up's adapter gets down's weight
    gm.graph.eliminate_dead_code()
    gm.recompile()
    with pytest.raises(VerifyError, match="invariant 3"):
        ir.verify(gm)


def test_invariant_6_meta_val():
    torch.manual_seed(0)
    from lowrank_compiler.frontend.trace import trace

    gm = lrc.transform(trace(TinyMLP().eval(), (torch.randn(2, 3, 8),), strategy="export"), "up:lora(r=2)")
    ir.verify(gm)
    del ir.adapter_nodes(gm)[0].meta["val"]
    with pytest.raises(VerifyError, match="invariant 6"):
        ir.verify(gm)


def test_invariant_8_baked_dropout(gm):
    node = ir.adapter_nodes(gm)[0]
    with gm.graph.inserting_after(node):
        d = gm.graph.call_function(torch.ops.aten.dropout.default, (node, 0.1, False))
    node.replace_all_uses_with(d, delete_user_cb=lambda u: u is not d)
    gm.recompile()
    with pytest.raises(VerifyError, match="invariant 8"):
        ir.verify(gm)


def test_invariant_9_frozen_base(gm):
    gm.get_parameter("up.weight").requires_grad_(True)
    with pytest.raises(VerifyError, match="invariant 9"):
        ir.verify(gm)


def test_pipeline_runs_verify_and_names_the_pass(gm):
    def breaks(g: fx.GraphModule) -> PassResult:
        g.get_parameter("down.weight").requires_grad_(True)
        return PassResult(g, True)

    with pytest.raises(VerifyError) as ei:
        Pipeline("demo", [Pass("breaks", breaks)], verify=True)(gm)
    assert any("pass 'breaks' of pipeline 'demo'" in n for n in ei.value.__notes__)


def test_spec_error_inside_a_pass_keeps_its_column():
    torch.manual_seed(0)
    spec = "up:lora(r=2); down:lora(r=99)"
    with pytest.raises(lrc.errors.SpecError) as ei:
        lrc.transform(TinyMLP().eval(), spec, (torch.randn(2, 3, 8),))
    assert ei.value.column == spec.index("down")  # the caret points at the rule that does not fit
    assert "r=99" in ei.value.reason
    assert any("pass 'match'" in n for n in ei.value.__notes__)
