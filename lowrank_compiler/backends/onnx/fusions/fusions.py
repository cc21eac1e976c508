"""The fusion pipeline on an ``onnx_ir`` model: onnxscript 0.7.2's stock ORT fusions plus our rules.

Mirrors ``onnxscript.rewriter.ort_fusions.optimize_for_ort`` (same fusions, same order) with these
changes: the LoRA bias hoist runs first (``lora_bias.py``), the stock MultiHeadAttention and
bias-into-attention rules are replaced by checked ones (``mha.py``, ``mha_bias.py``), a lone
RMSNorm goes back to primitive ops (``rms_lone.py``), and ``RemoveInitializersFromInputsPass`` is
not run, because an initializer that is also a graph input is how a LoRA weight stays overridable
by an ``.onnx_adapter``.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import optimize as os_optimize
from onnxscript.rewriter import rewrite
from onnxscript.rewriter.ort_fusions import shape_optimization
from onnxscript.rewriter.ort_fusions._core import ORT_PATTERN_REWRITE_RULES
from onnxscript.rewriter.ort_fusions.attention import fuse_attention
from onnxscript.rewriter.ort_fusions.bias_gelu import fuse_bias_gelu
from onnxscript.rewriter.ort_fusions.cos_sin_cache import fuse_cos_sin_cache
from onnxscript.rewriter.ort_fusions.erfgelu import fuse_erfgelu
from onnxscript.rewriter.ort_fusions.gelu import fuse_gelu
from onnxscript.rewriter.ort_fusions.gqa import fuse_gqa
from onnxscript.rewriter.ort_fusions.gqa_packed_qkv import fuse_qkv_gqa
from onnxscript.rewriter.ort_fusions.mha_scale import fuse_mha_scale
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_partial_rotary_embedding, fuse_rotary_embedding
from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha
from onnxscript.rewriter.ort_fusions.skip_normalization import (
    fuse_skip_layer_normalization,
    fuse_skip_rms_normalization,
)
from onnxscript.rewriter.rules.common import _gemm_to_matmul_add

from lowrank_compiler.backends.onnx.fusions.lora_bias import fuse_lora_bias
from lowrank_compiler.backends.onnx.fusions.mha import fuse_mha1, fuse_mha2
from lowrank_compiler.backends.onnx.fusions.mha_bias import fuse_mha_bias
from lowrank_compiler.backends.onnx.fusions.rms_lone import fuse_lone_rms

# name -> (fusion, group). Groups let optimize() retry without a group whose result fails verification.
STAGES: dict[str, tuple[Callable[..., int], str]] = {
    "lora_bias_hoist": (fuse_lora_bias, "attention"),        # ours
    "erf_gelu": (fuse_erfgelu, "elementwise"),
    "rms_normalization": (fuse_rms_normalization, "norm"),
    "skip_layer_normalization": (fuse_skip_layer_normalization, "norm"),
    "skip_rms_normalization": (fuse_skip_rms_normalization, "norm"),
    "lone_rms_unfused": (fuse_lone_rms, "norm"),              # ours: keeps the model onnx.checker-clean
    "rotary_embedding": (fuse_rotary_embedding, "rotary"),
    "cos_sin_cache": (fuse_cos_sin_cache, "rotary"),
    "partial_rotary_embedding": (fuse_partial_rotary_embedding, "rotary"),
    "sdpa": (fuse_sdpa, "attention"),
    "gqa": (fuse_gqa, "gqa"),
    "packed_qkv_for_gqa": (fuse_qkv_gqa, "gqa"),
    "mha1": (fuse_mha1, "attention"),                        # ours: the stock rule, output reshape checked
    "mha2": (fuse_mha2, "attention"),                        # ours: the same without past key/value
    "mha_scale": (fuse_mha_scale, "attention"),
    "mha_bias": (fuse_mha_bias, "attention"),                # ours: the stock rule plus a bias check
    "attention": (fuse_attention, "attention"),
    "gelu": (fuse_gelu, "elementwise"),
    "bias_gelu": (fuse_bias_gelu, "elementwise"),
    "sdpa_via_mha": (replace_sdpa_by_mha, "attention"),
}
GROUPS = ("norm", "elementwise", "rotary", "attention", "gqa")


def run_fusions(model: ir.Model, groups: tuple[str, ...] = GROUPS) -> dict[str, int]:
    """Fuse ``model`` in place with the stages of ``groups``; returns ``{stage: rewrites}``."""
    counts: dict[str, int] = {}
    rewrite(model, [_gemm_to_matmul_add.gemm_to_matmul_add_rule])
    common_passes.ShapeInferencePass()(model)
    os_optimize(model)
    shape_optimization.rules.apply_to_model(model)
    os_optimize(model)
    for name, (fuse, group) in STAGES.items():
        if group not in groups:
            continue
        if name == "mha_bias" and not (counts.get("mha1") or counts.get("mha2")):
            counts[name] = 0
            continue
        if name == "partial_rotary_embedding":
            common_passes.CommonSubexpressionEliminationPass()(model)
        counts[name] = fuse(model, apply_shape_inference=(name == "sdpa"))
    os_optimize(model)  # inlines intermediate fusion functions (SDPA) that no later fusion consumed
    rewrite(model, ORT_PATTERN_REWRITE_RULES)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model)
    common_passes.ShapeInferencePass()(model)
    return counts
