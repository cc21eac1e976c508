"""Several adapters on one model: named sets with PEFT semantics (named) and one batch with a different set per
row (mixed).

May import: everything in layers 1-5 (``errors`` ... ``passes``).
"""
