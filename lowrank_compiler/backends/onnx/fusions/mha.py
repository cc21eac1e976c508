"""Rule: scaled-dot-product attention → ``MultiHeadAttention``, with the output reshape checked.

onnxscript 0.7.2's stock ``MultiHeadAttention`` rule matches ``Reshape(Transpose(sdpa))`` with any
target shape and replaces it by the MHA output, which is [batch, seq, d] (its TODO: "verify
Reshapes"). GPT-2 flattens the attention output to [batch·seq, d] for its Conv1D (``Gemm``), so the
stock rewrite hands a 3-D tensor to a 2-D ``Gemm`` and ONNX Runtime refuses to load the model. This
subclass accepts the reshape only when its output is [batch, seq, d] (the stock case) or
[batch·seq, d] with a constant d; for the latter it appends a ``Reshape(·, [-1, d])`` to the MHA output,
so GPT-2's attention fuses too.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import _fusion_utils, pattern
from onnxscript.rewriter.ort_fusions.mha import MultiHeadAttention


class CheckedMultiHeadAttention(MultiHeadAttention):
    def check(self, op, query_BSD: ir.Value, attention_reshaped: ir.Value | None = None, **kw) -> pattern.MatchResult:
        result = super().check(op, query_BSD=query_BSD, **kw)
        if not result:
            return result
        q, out = query_BSD.shape, attention_reshaped.shape if attention_reshaped is not None else None
        self._flat_width = None
        if out is None or q is None or len(q) != 3 or not isinstance(q[2], int):
            return result.fail("the attention output's shape is unknown", attention_reshaped)
        if len(out) == 3 and out[2] == q[2] and all(isinstance(d, int) or d == e for d, e in zip(out[:2], q[:2])):
            return result
        if len(out) == 2 and out[1] == q[2]:
            self._flat_width = q[2]
            return result
        return result.fail(f"the attention output is reshaped to {out}, not [B, S, {q[2]}] or [B*S, {q[2]}]",
                           attention_reshaped)

    def rewrite(self, op, **kw):
        out = super().rewrite(op, **kw)
        if out is None or self._flat_width is None:
            return out
        flat_shape = op.Constant(value_ints=[-1, self._flat_width])
        if isinstance(out, (tuple, list)):
            return (op.Reshape(out[0], flat_shape), *out[1:])
        return op.Reshape(out, flat_shape)


def _rule_set(has_past_present: bool) -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([
        CheckedMultiHeadAttention.rule(f"CheckedMHA{'_Rotary' if rot else ''}{'_Past' if has_past_present else ''}"
                                       f"{'_CrossAttention' if cross else ''}", is_rotary=rot,
                                       has_past_present=has_past_present, is_cross_attention=cross)
        for rot in (False, True) for cross in ((False,) if has_past_present else (False, True))])


fuse_mha1 = _fusion_utils.apply_fusion_rules(_rule_set(True))   # with past key/value first, as the stock order
fuse_mha2 = _fusion_utils.apply_fusion_rules(_rule_set(False))
