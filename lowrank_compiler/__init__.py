"""lowrank-compiler: low-rank adaptation as graph rewriting over torch.fx.

The public face is the names in ``__all__``; everything else is reachable through its module
(``lowrank_compiler.frontend.trace``, ``lowrank_compiler.formats.peft``, ``lowrank_compiler.ir`` ...).
"""

from lowrank_compiler import backends
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
from lowrank_compiler.api import (
    adapters,
    lower_memory,
    merge,
    merge_adapters,
    print_trainable_parameters,
    transform,
    unmerge_adapters,
)
from lowrank_compiler.backends.export import export
from lowrank_compiler.backends.onnx import export as _onnx_backend  # noqa: F401  (makes lrc.backends.onnx available)
from lowrank_compiler.backends.torch_compile import compile, lower
from lowrank_compiler.errors import ExportError, InitError, LoadError, LrcError, MergeError, SpecError, TraceError
from lowrank_compiler.formats.model import load, load_adapters, save, save_adapters
from lowrank_compiler.formats.peft import load_peft
from lowrank_compiler.methods import AdapterMethod, register_method
from lowrank_compiler.spec.language import Spec, parse_spec
from lowrank_compiler.training import distributed  # noqa: F401  (lrc.distributed: DDP / FSDP2 helpers)
from lowrank_compiler.training.optimizer import optimizer, trainer_optimizers

__version__ = "0.1.0"

__all__ = [
    # the pipeline
    "transform", "optimizer", "trainer_optimizers", "adapters", "print_trainable_parameters",
    "merge", "merge_adapters", "unmerge_adapters", "lower", "lower_memory",
    "save", "load", "save_adapters", "load_adapters", "load_peft", "export", "compile",
    # extending
    "Spec", "parse_spec", "AdapterMethod", "register_method", "backends",
    # errors
    "LrcError", "SpecError", "TraceError", "LoadError", "ExportError", "InitError", "MergeError",
    # named adapters (PEFT semantics)
    "add_adapter", "set_adapter", "delete_adapter", "disable_adapters", "active_adapter", "adapter_names",
    "load_adapter", "save_named_adapters", "load_named_adapters",
    # mixed-adapter batches (adapter_ids per row)
    "mixed_batch", "mixed_add", "adapter_ids",
]
