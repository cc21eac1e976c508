"""ONNX Runtime graph fusions for exported models: ``optimize(model) -> (fused model, report)``.

ORT's own transformer optimizer (``onnxruntime.transformers.optimizer``, model_type ``bert``) finds 0
Attention fusions in a torch 2.13 dynamo export: the exporter decomposes scaled-dot-product attention
(K transposed through Reshape/Transpose/Reshape, the 1/sqrt(d) scale split over Q and K, a
Where(IsNaN) after the Softmax) into a shape none of its patterns match. onnxscript's stock ORT
fusions do match it. This module runs them (``fusions.py``) with our own rules where they do not fit
our graphs (``lora_bias.py``, ``mha_bias.py``, ``mha.py``, ``rms_lone.py``), keeps LoRA weights overridable, and accepts the result
only if ONNX Runtime's outputs on sample inputs (and with a random probe adapter when the graph has
LoRA inputs) match the unfused model within ``tolerance`` and it passes ``onnx.checker``; otherwise it retries with fewer fusion
groups and finally returns the model unchanged, saying why (``strict=True`` raises instead).
"""

from __future__ import annotations

import collections
import time
from typing import Any

import numpy as np
import onnx

from lowrank_compiler.backends.onnx.fusions.fusions import GROUPS, STAGES, run_fusions
from lowrank_compiler.backends.onnx.fusions.verify import (
    drift,
    overridable,
    probe_adapter,
    run_all,
    sample_feeds,
    session,
)
from lowrank_compiler.errors import ExportError
from lowrank_compiler.quiet import quiet

__all__ = ["optimize", "DEFAULT_TOLERANCE", "GROUPS", "STAGES", "format_report"]

# Max |fused − unfused| allowed, relative to max(1, max |unfused output|). Fused kernels only reorder fp32
# sums: MiniLM's fused graph moves its outputs by ~3e-6 (as much as ORT differs from torch), while a
# wrong mask, bias or adapter path moves them by 1e-2 or more, so 1e-4 is 30x above the noise and 100x below a bug.
DEFAULT_TOLERANCE = 1e-4


# ops a fusion produces (ORT contrib ops; LayerNormalization and SimplifiedLayerNormalization ORT runs in the ONNX domain)
FUSED_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "RotaryEmbedding", "SkipLayerNormalization",
             "LayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "BiasGelu",
             "FastGelu", "Gelu", "FusedMatMul")


def _fused_ops(before: Any, after: Any) -> dict[str, int]:
    """``{op: count}`` of the fused ops that ``after`` has more of than ``before``."""
    b, a = (collections.Counter(n.op_type for n in m.graph.node) for m in (before, after))
    return {op: a[op] - b[op] for op in FUSED_OPS if a[op] > b[op]}


def _fuse(data: bytes, groups: tuple[str, ...]) -> tuple[Any, dict[str, int]]:
    import onnx_ir as ir

    irm = ir.from_proto(onnx.load_model_from_string(data))  # a fresh copy: the passes write through to the proto
    counts = run_fusions(irm, groups)
    return ir.to_proto(irm), counts


def _check_adapters_kept(before: dict[str, list[object]], fused: Any) -> None:
    after = overridable(fused)
    used = {i for n in fused.graph.node for i in n.input}
    lost = [k for k in before if k not in after or k not in used]
    if lost:
        raise ExportError(f"the fused graph lost overridable inputs {lost[:3]}")


@quiet
def optimize(model: Any, *, feeds: dict[str, np.ndarray] | list[dict[str, np.ndarray]] | None = None,
             tolerance: float = DEFAULT_TOLERANCE, groups: tuple[str, ...] = GROUPS, strict: bool = False,
             threads: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Fuse ``model`` (an ``onnx.ModelProto``) for ONNX Runtime; returns ``(model, report)``.

    ``feeds``: sample inputs (one dict or a list) for the numerics check; default: random ones from the
    input signature (:func:`verify.sample_feeds`). Graphs with overridable LoRA inputs are also checked
    with a random probe adapter fed to those inputs. ``groups`` limits the fusions (``norm``,
    ``elementwise``, ``rotary``, ``attention``, ``gqa``). Report: ``fusions`` (rewrites per stage),
    ``ops`` (fused ops in the result), ``groups`` (applied), ``max_abs_diff`` / ``scale``,
    ``fallback`` (why fewer or no fusions were kept, else None), ``seconds``.

    Raises:
        ExportError: bad ``groups``; ``strict`` and the full fusion set failed (error or drift).
    """
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise ExportError(f"unknown fusion groups {bad}; valid: {', '.join(GROUPS)}")
    t0 = time.perf_counter()
    feed_sets = [feeds] if isinstance(feeds, dict) else list(feeds) if feeds is not None else [sample_feeds(model)]
    lora = overridable(model)
    probe = probe_adapter(model)
    if probe:
        feed_sets = feed_sets + [{**f, **probe} for f in feed_sets]
    try:
        data = model.SerializeToString()
        ref = run_all(session(data, threads), feed_sets)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"ONNX Runtime cannot run the unfused model on the sample inputs {sorted(feed_sets[0])}: "
                          f"{str(e).strip().splitlines()[0][:200]}; pass feeds= that fit the model") from None
    scale = max(1.0, drift(ref, ref)[1])
    reasons: list[tuple[tuple[str, ...], str]] = []

    def attempt(gs: tuple[str, ...]) -> tuple[Any, dict[str, Any]] | None:
        counts: dict[str, int] = {}
        try:
            fused, counts = _fuse(data, gs)
            _check_adapters_kept(lora, fused)
            onnx.checker.check_model(fused, full_check=True)  # e.g. a lone SimplifiedLayerNormalization is not ONNX
            got = run_all(session(fused.SerializeToString(), threads), feed_sets)
        except Exception as e:  # noqa: BLE001  (a rule that breaks the graph: fall back, say why)
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            reasons.append((gs, f"{type(e).__name__}: {msg}"))
            return None
        diff, _ = drift(ref, got)
        if diff > tolerance * scale:
            reasons.append((gs, f"outputs moved by {diff:.3g} (> {tolerance:g} x {scale:.3g})"))
            return None
        report = {"fusions": counts, "ops": _fused_ops(model, fused), "groups": list(gs), "max_abs_diff": diff,
                  "scale": scale, "fallback": _why(reasons) or None}
        return fused, report

    result = attempt(tuple(groups))
    if result is None and strict:
        raise ExportError("ORT fusions refused: " + _why(reasons) + "; pass strict=False to fall back")
    for drop in reversed(groups):  # find the one group to leave out (attention first: the riskiest rules)
        if result is not None:
            break
        if len(groups) > 1:
            result = attempt(tuple(g for g in groups if g != drop))
    if result is None:
        result = model, {"fusions": {}, "ops": {}, "groups": [], "max_abs_diff": 0.0, "scale": scale,
                         "fallback": "kept the unfused model: " + _why(reasons)}
    result[1]["seconds"] = time.perf_counter() - t0
    return result


def _why(reasons: list[tuple[tuple[str, ...], str]]) -> str:
    """Each distinct failure once, with the fusion-group sets that hit it (first one in full)."""
    by_msg: dict[str, list[tuple[str, ...]]] = {}
    for gs, msg in reasons:
        by_msg.setdefault(msg, []).append(gs)
    parts = []
    for msg, sets in by_msg.items():
        more = f" (and {len(sets) - 1} smaller group sets)" if len(sets) > 1 else ""
        parts.append(f"with {'+'.join(sets[0])}{more}: {msg}")
    return "; ".join(parts)


def format_report(r: dict[str, Any]) -> str:
    """One line: the fused ops and their counts, the drift, and any fallback."""
    ops = ", ".join(f"{v} {k}" for k, v in r["ops"].items() if v) or "none"
    line = f"ORT fusions: {ops} (max |fused - unfused| {r['max_abs_diff']:.2g}, {r['seconds']:.1f} s)"
    return line + (f"; {r['fallback']}" if r.get("fallback") else "")
