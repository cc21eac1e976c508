"""Rule: a ``SimplifiedLayerNormalization`` that no skip fusion absorbed goes back to primitive ops.

onnxscript's RMSNorm fusion emits ``SimplifiedLayerNormalization`` in the ONNX domain (where ONNX
Runtime registers it), but it is not an ONNX op before opset 23, so ``onnx.checker`` rejects the
model. Most of them become ``SkipSimplifiedLayerNormalization`` (com.microsoft, which the checker
skips); the ones left (Llama's first-layer input norm reads the embeddings, with no residual add) are
written back as ``x / sqrt(mean(x²) + eps) · scale``, so the model stays checker-clean and keeps the
skip fusions. fp32 only; other dtypes are left alone (the check then drops the norm group).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import _fusion_utils, pattern


class LoneRmsNormToPrimitives(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, scale):
        return op.SimplifiedLayerNormalization(x, scale, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, x: ir.Value, scale: ir.Value, out: ir.Value, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = out.producer()
        if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            return result.fail("the inverse std-dev output is used")
        if x.dtype != ir.DataType.FLOAT or x.shape is None:
            return result.fail("only fp32 inputs of known rank are rewritten", x)
        axis = node.attributes.get_int("axis", -1)
        if axis not in (-1, len(x.shape) - 1):
            return result.fail(f"normalizes axis {axis}, not the last", x)
        self._eps = node.attributes.get_float("epsilon", 1e-5)
        return result

    def rewrite(self, op, x, scale, **_):
        mean_sq = op.ReduceMean(op.Mul(x, x), op.Constant(value_ints=[-1]), keepdims=1)
        std = op.Sqrt(op.Add(mean_sq, op.Constant(value_float=self._eps)))
        return op.Mul(op.Div(x, std), scale)


rules = pattern.RewriteRuleSet([LoneRmsNormToPrimitives.rule(name="LoneRmsNormToPrimitives")])
fuse_lone_rms = _fusion_utils.apply_fusion_rules(rules)
