"""ONNX and ONNX Runtime: export (export), adapter files (adapters), KV-cache decoding (generate), per-row adapter
graphs (mixed), running a graph (run), onnxruntime-genai folders (genai), int8/int4 quantization (quantize,
smoothquant; causal-LM decode graphs: quantize_decoder) and ORT graph fusions (fusions/).

May import: every layer below ``backends``.
"""

from lowrank_compiler.backends.onnx.export import export_onnx, resolve_providers, session

__all__ = ["export_onnx", "resolve_providers", "session"]
