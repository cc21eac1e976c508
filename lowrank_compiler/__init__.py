"""lowrank-compiler: low-rank adaptation as graph rewriting over torch.fx.

The public face is the names in ``__all__``; everything else is reachable through its module
(``lowrank_compiler.trace``, ``lowrank_compiler.backends.peft``, ``lowrank_compiler.ir`` ...).
"""

from . import backends, distributed  # noqa: F401  (lrc.distributed: DDP / FSDP2 helpers)
from .api import adapters, lower_memory, merge, merge_adapters, print_trainable_parameters, transform, unmerge_adapters
from .backends import onnx as _onnx_backend  # noqa: F401  (makes lrc.backends.onnx available)
from .backends.export import export
from .backends.peft import load_peft
from .backends.torch_compile import compile, lower
from .batched import adapter_ids, mixed_add, mixed_batch
from .errors import ExportError, InitError, LoadError, LrcError, MergeError, SpecError, TraceError
from .methods import AdapterMethod, register_method
from .named import (
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
from .passes.train import optimizer, trainer_optimizers
from .serialize import load, load_adapters, save, save_adapters
from .spec import Spec, parse_spec

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
