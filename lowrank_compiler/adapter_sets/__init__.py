"""Several adapters on one model: named sets with PEFT semantics (named) and one batch with a different set per
row (mixed).

May import: every layer below (``errors`` ... ``api``, ``formats``).
"""

from lowrank_compiler.adapter_sets.mixed import adapter_ids, mixed_add, mixed_batch
from lowrank_compiler.adapter_sets.named import (
    active_adapter,
    adapter_names,
    add_adapter,
    delete_adapter,
    disable_adapters,
    load_adapter,
    load_named_adapters,
    save_named_adapters,
    set_adapter,
)
from lowrank_compiler.adapter_sets.pretrained import from_pretrained, save_pretrained
from lowrank_compiler.adapter_sets.rows import per_row_adapters

__all__ = [
    "add_adapter", "set_adapter", "delete_adapter", "disable_adapters", "active_adapter", "adapter_names",
    "load_adapter", "save_named_adapters", "load_named_adapters", "mixed_batch", "mixed_add", "adapter_ids",
    "save_pretrained", "from_pretrained", "per_row_adapters",
]
