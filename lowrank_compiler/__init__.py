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
from .passes.train import optimizer, trainer_optimizers
from .spec import Spec, parse_spec
from .trace import trace

__version__ = "0.1.0"

__all__ = [
    "ExportError", "InitError", "LoadError", "LrcError", "Spec", "SpecError", "TraceError",
    "adapters", "get_method", "load", "load_adapters", "merge", "merge_adapters", "method_names",
    "parse_spec", "print_trainable_parameters", "register_method", "save", "save_adapters", "trace",
    "trainable_parameters", "transform", "unmerge_adapters",
]
__all__ += ["optimizer", "trainer_optimizers"]
