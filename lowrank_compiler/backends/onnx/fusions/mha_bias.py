"""Rule: fold q/k/v bias adds into ``MultiHeadAttention``, only when each bias is a 1-D constant.

onnxscript 0.7.2's stock ``FuseBiasMHA`` binds *any* ``Add`` operand as the bias. On a graph with a
separate LoRA branch (``q = (x·W + b) + (x·A)·B``) it takes the [batch, seq, d] LoRA delta for the
bias and builds a ``Concat`` of mismatched ranks that ONNX Runtime refuses to load. This subclass keeps
the stock pattern and rewrite and adds the missing check: every bias it folds is a rank-1 constant of
the projection's width (not a graph input, so an overridable initializer is never folded).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import _fusion_utils, pattern
from onnxscript.rewriter.ort_fusions.mha_bias import FuseBiasMHA


def is_constant_vector(v: ir.Value | None, size: object) -> bool:
    """``v`` is a constant (initializer that is not a graph input, or Constant output) of shape [size]."""
    if v is None or v.is_graph_input() or ir.convenience.get_const_tensor(v) is None:
        return False
    shape = v.shape if v.shape is not None else ir.convenience.get_const_tensor(v).shape
    return shape is not None and len(shape) == 1 and isinstance(size, int) and shape[0] == size


class CheckedFuseBiasMHA(FuseBiasMHA):
    """``FuseBiasMHA`` that refuses non-constant or non-vector "biases" (e.g. a LoRA delta)."""

    def check(self, context, q_bias=None, k_bias=None, v_bias=None, has_q_bias=False, has_k_bias=False,
              has_v_bias=False, **kw) -> pattern.MatchResult:
        result = super().check(context, has_q_bias=has_q_bias, has_k_bias=has_k_bias, has_v_bias=has_v_bias, **kw)
        if not result:
            return result
        for tag, has, bias, width in (("query", has_q_bias, q_bias, self.Dh_q), ("key", has_k_bias, k_bias, self.Dh_k),
                                      ("value", has_v_bias, v_bias, self.Dh_v)):
            if has and not is_constant_vector(bias, width):
                return result.fail(f"the {tag} 'bias' is not a constant vector of size {width}", bias)
        return result


rules = pattern.RewriteRuleSet([CheckedFuseBiasMHA.rule(name="CheckedFuseBiasMHA")])
fuse_mha_bias = _fusion_utils.apply_fusion_rules(rules)
