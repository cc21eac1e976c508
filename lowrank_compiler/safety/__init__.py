"""Guards against untrusted input and lossy writes: the torch.export archive check (pt2), the one rule for
names that reach generated Python (names), the shape-expression grammar (symexpr), manifest/record/tensor schemas (schema), regex backtracking bounds (regex), atomic writes (atomic).

May import: ``errors``, ``quiet``, ``methods``, ``ir``.
"""
