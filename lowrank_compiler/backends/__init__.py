"""Runtimes: one entry for every deployment format (export), torch.compile (torch_compile) and ONNX Runtime
(onnx/).

May import: every layer below (``errors`` ... ``formats``, ``lowerings``).
"""
