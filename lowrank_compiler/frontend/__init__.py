"""Model -> GraphModule and the model's calling convention: tracing (trace), the face that serves every call
signature and ``generate`` (face), shared module hierarchies (hierarchy), tied tensors (tied), the trace cache
(trace_cache).

May import: everything in layers 1-5 (``errors`` ... ``passes``).
"""
