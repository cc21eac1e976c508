"""lowrank-compiler: low-rank adaptation as graph rewriting over torch.fx."""

from .api import (
    adapters,
    merge,
    merge_adapters,
    print_trainable_parameters,
    trainable_parameters,
    transform,
    unmerge_adapters,
)
from .errors import ExportError, InitError, LoadError, LrcError, SpecError, TraceError
from .io import load, load_adapters, save, save_adapters
from .methods import get_method, method_names, register_method
from .spec import Spec, parse_spec
from .trace import trace

__version__ = "0.1.0"

__all__ = [
    "ExportError", "InitError", "LoadError", "LrcError", "Spec", "SpecError", "TraceError",
    "adapters", "get_method", "load", "load_adapters", "merge", "merge_adapters", "method_names",
    "parse_spec", "print_trainable_parameters", "register_method", "save", "save_adapters", "trace",
    "trainable_parameters", "transform", "unmerge_adapters",
]

# export / lowering (issue 5)
from . import backends  # noqa: E402
from .backends import onnx as _onnx_backend  # noqa: E402,F401  (makes lrc.backends.onnx available)
from .backends.torch_compile import compile  # noqa: E402
from .export import export  # noqa: E402
from .peft_io import load_peft, save_peft  # noqa: E402

__all__ += ["backends", "compile", "export", "load_peft", "save_peft"]
