"""The IR: a ``torch.fx.GraphModule`` and lrc's facts about it.

lrc's facts live in ``node.meta["lrc"]`` (a :class:`SiteMark` on a linear the spec adapts, an
:class:`AdapterMark` on an adapter call) and ``gm.meta["lrc"]`` (graph-level records: example inputs,
input names, specs). ``marks`` is the vocabulary every reader shares, ``surgery`` the rewrites pass
authors share, ``invariants`` (``verify``) the invariants of docs/INVARIANTS.md in code.

May import: ``errors``, ``methods.base``. Imported by every layer above.
"""

from lowrank_compiler.ir.invariants import verify
from lowrank_compiler.ir.marks import (
    ADAPTER_ATTR,
    META_KEY,
    NAMED_ROOT,
    AdapterMark,
    SiteMark,
    TrainOnlySDPA,
    VerifyError,
    adapter_nodes,
    adapter_path,
    adapter_sites,
    adapters_of,
    example_inputs,
    logical_weight,
    lrc_meta,
    set_logical_weight,
)
from lowrank_compiler.ir.surgery import (
    adapter_to_linear,
    delete_submodule,
    finalize,
    fresh_name,
    frozen_shared_copy,
    get_attr_tensor,
    lookup_attr,
    replace_with_module,
    shared_copy,
)

__all__ = [
    "META_KEY",
    "ADAPTER_ATTR",
    "NAMED_ROOT",
    "VerifyError",
    "SiteMark",
    "AdapterMark",
    "lrc_meta",
    "example_inputs",
    "adapter_nodes",
    "adapter_sites",
    "adapters_of",
    "adapter_path",
    "logical_weight",
    "set_logical_weight",
    "TrainOnlySDPA",
    "finalize",
    "fresh_name",
    "replace_with_module",
    "frozen_shared_copy",
    "shared_copy",
    "adapter_to_linear",
    "delete_submodule",
    "get_attr_tensor",
    "lookup_attr",
    "verify",
]
