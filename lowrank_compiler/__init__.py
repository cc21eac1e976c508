"""lowrank-compiler: low-rank adaptation as graph rewriting over torch.fx."""

from . import backends
from .api import (
    adapters,
    merge,
    merge_adapters,
    print_trainable_parameters,
    trainable_parameters,
    transform,
    unmerge_adapters,
)
from .backends import onnx as _onnx_backend  # noqa: F401  (makes lrc.backends.onnx available)
from .backends.torch_compile import compile
from .errors import ExportError, InitError, LoadError, LrcError, SpecError, TraceError
from .backends.export import export
from .serialize import load, load_adapters, save, save_adapters
from .methods import get_method, method_names, register_method
from .passes.train import optimizer, trainer_optimizers
from .backends.peft import load_peft, save_peft
from .backends.rebase import original_base_pairs, original_base_peft
from .spec import Spec, parse_spec
from .trace import trace

__version__ = "0.1.0"

__all__ = [
    "ExportError", "InitError", "LoadError", "LrcError", "Spec", "SpecError", "TraceError",
    "adapters", "backends", "compile", "export", "get_method", "load", "load_adapters", "load_peft", "merge",
    "merge_adapters", "method_names", "optimizer", "original_base_pairs", "original_base_peft", "parse_spec", "print_trainable_parameters", "register_method",
    "save", "save_adapters", "save_peft", "trace", "trainable_parameters", "trainer_optimizers", "transform",
    "unmerge_adapters",
]
