"""lowrank-compiler: low-rank adaptation as graph rewriting over torch.fx.

The stable surface is the names in ``__all__`` and the namespaces ``lrc.errors``, ``lrc.adapter_sets`` and
``lrc.training`` (``lrc.backends.onnx`` stays reachable as a module for runtime helpers such as ``session``). Older top-level names still resolve for one release and warn (:data:`_DEPRECATED`).
docs/DESIGN_NOTES.md maps the package folders and what each may import.
"""

import importlib
import warnings
from typing import Any

from lowrank_compiler import adapter_sets, errors, training
from lowrank_compiler.api import adapters, merge, print_trainable_parameters, transform, unmerge
from lowrank_compiler.backends.export import export
from lowrank_compiler.backends.torch_compile import compile
from lowrank_compiler.errors import LrcError
from lowrank_compiler.formats.load import load, load_adapters
from lowrank_compiler.formats.model import save, save_adapters
from lowrank_compiler.formats.peft_load import load_peft
from lowrank_compiler.lowerings import lower
from lowrank_compiler.methods import AdapterMethod, register_method
from lowrank_compiler.spec.language import Spec
from lowrank_compiler.training.optimizer import optimizer

__version__ = "0.1.0"

__all__ = [
    # the pipeline
    "transform", "adapters", "optimizer", "merge", "unmerge", "lower", "compile", "export",
    "save", "load", "save_adapters", "load_adapters", "load_peft", "print_trainable_parameters",
    # extending
    "Spec", "AdapterMethod", "register_method",
    # errors
    "LrcError",
    # namespaces
    "errors", "adapter_sets", "training",
]

#: old name -> (module, attribute, what to use now); resolved on first use with a DeprecationWarning
_DEPRECATED: dict[str, tuple[str, str, str]] = {
    "merge_adapters": ("lowrank_compiler.api", "merge_adapters", "lrc.merge(gm, keep_adapters=True)"),
    "unmerge_adapters": ("lowrank_compiler.api", "unmerge_adapters", "lrc.unmerge(gm)"),
    "lower_memory": ("lowrank_compiler.api", "lower_memory", 'lrc.lower(gm, "memory", ...)'),
    "parse_spec": ("lowrank_compiler.spec.language", "parse_spec", "lrc.Spec.parse"),
    "trainer_optimizers": ("lowrank_compiler.training.optimizer", "trainer_optimizers",
                           "lrc.training.trainer_optimizers"),
    "distributed": ("lowrank_compiler.training.distributed", "", "lrc.training.distributed"),
    **{n: ("lowrank_compiler.adapter_sets.named", n, f"lrc.adapter_sets.{n}")
       for n in ("add_adapter", "set_adapter", "delete_adapter", "disable_adapters", "active_adapter",
                 "adapter_names", "load_adapter", "save_named_adapters", "load_named_adapters")},
    **{n: ("lowrank_compiler.adapter_sets.mixed", n, f"lrc.adapter_sets.{n}")
       for n in ("mixed_batch", "mixed_add", "adapter_ids")},
    **{n: ("lowrank_compiler.errors", n, f"lrc.errors.{n}")
       for n in ("SpecError", "TraceError", "LoadError", "ExportError", "InitError", "MergeError")},
}


def __getattr__(name: str) -> Any:
    if name not in _DEPRECATED:
        raise AttributeError(f"module 'lowrank_compiler' has no attribute {name!r}")
    module, attr, instead = _DEPRECATED[name]
    warnings.warn(f"lrc.{name} is deprecated and goes away in the next release; use {instead}",
                  DeprecationWarning, stacklevel=2)
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod


def __dir__() -> list[str]:
    return sorted([*__all__, *_DEPRECATED, "__version__"])
