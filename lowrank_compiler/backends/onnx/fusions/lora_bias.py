"""Rule: move a linear's bias past its LoRA branch, ``(x·W + b) + (x·A)·B  →  (x·W + (x·A)·B) + b``.

A separate (swappable-adapter) export computes each LoRA site as ``linear(x, W, b) + (x @ A) @ B``,
so the bias add sits under the LoRA add and the bias-into-attention fusion cannot see it. Hoisting
the constant bias to the outside makes it the last ``Add`` before ``MultiHeadAttention`` again (the
guarded bias fusion in ``mha_bias.py`` then folds it) and keeps ``A``/``B`` as they were: the same
overridable inputs, so ``.onnx_adapter`` files still switch. Only fp32 reassociation changes.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import _fusion_utils, pattern

from lowrank_compiler.backends.onnx.fusions.mha_bias import is_constant_vector


class HoistBiasPastLora(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, w, b, h, lora_b):
        return op.Add(op.Add(op.MatMul(x, w), b), op.MatMul(h, lora_b, _outputs=["delta"]))

    def check(self, context, x: ir.Value, w: ir.Value, b: ir.Value, h: ir.Value, delta: ir.Value,
              **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        width = w.shape[-1] if w.shape is not None and len(w.shape) == 2 else None
        if not is_constant_vector(b, width):
            return result.fail("the inner Add is not a bias (constant vector of the output width)", b)
        producer = h.producer()
        if producer is None or producer.op_type != "MatMul" or producer.domain not in ("", "ai.onnx"):
            return result.fail("the outer Add's other operand is not a LoRA branch (x·A)·B", delta)
        if producer.inputs[0] is not x:
            return result.fail("the LoRA branch reads a different input than the base MatMul", h)
        return result

    def rewrite(self, op, x, w, b, h, lora_b, **_):
        return op.Add(op.Add(op.MatMul(x, w), op.MatMul(h, lora_b)), b)


rules = pattern.RewriteRuleSet([HoistBiasPastLora.rule(name="HoistBiasPastLora")], commute=True)
fuse_lora_bias = _fusion_utils.apply_fusion_rules(rules)
