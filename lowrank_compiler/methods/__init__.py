"""Adapter methods: one file each, registered by name (see base.py for the contract).

Every module in this package is imported here, so a new ``methods/<name>.py`` that uses
``@register_method`` is available in specs without touching this file. ``gradstats`` holds the gradient
statistics that data-dependent inits (LoRA-GA, LoRA-drop, ALoRA) consume.

May import: ``errors``, ``quiet``. A method never sees a graph.
"""

import importlib
import pkgutil

from lowrank_compiler.methods.args import Arg
from lowrank_compiler.methods.base import (
    AdapterMethod,
    SiteInfo,
    StepContext,
    get_method,
    method_names,
    register_method,
)

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_") and _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["AdapterMethod", "Arg", "SiteInfo", "StepContext", "get_method", "method_names", "register_method"]
