"""The face of a loaded model: rebuild the original HF model around the loaded graph's own tensors.

A file saved from a Hugging Face model records its config (JSON) and its class *by name* (``model_class``).
:func:`rebuild_hf_model` looks the name up in ``transformers`` itself (a class transformers defines, never
code from the file, never ``trust_remote_code``), builds it from the config with its parameters on the
``meta`` device (no weights are allocated), then points every parameter at the loaded graph's tensor of
the same name. The result is what :func:`lowrank_compiler.frontend.module.attach` needs to serve every call
signature and ``generate`` over the loaded weights and adapters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn

from lowrank_compiler.errors import LoadError
from lowrank_compiler.formats.hf import hf_class
from lowrank_compiler.frontend.capture import model_record
from lowrank_compiler.frontend.hierarchy import lookup_attr
from lowrank_compiler.ir import lrc_meta

_NOT_CONFIG = ("auto_map",)  # remote-code pointers: never followed, not kept


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside moves to ``meta`` at once (buffers stay real: rotary tables ...)."""
    orig = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        orig(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = orig  # type: ignore[method-assign]


def transformers_class(name: Any) -> type | None:
    """The ``transformers`` model class called ``name`` (one transformers itself defines), else None."""
    try:
        cls = hf_class([name]) if isinstance(name, str) and name.isidentifier() else None
    except ImportError:  # no transformers: the model loads without its HF face
        return None
    return cls if cls is not None and cls.__module__.startswith("transformers.") else None


def rebuild_hf_model(meta: dict[str, Any], gm: fx.GraphModule, source: str) -> nn.Module | None:
    """The original HF model over ``gm``'s tensors, or None when the file records no config of a model class
    transformers defines (a user's own class is never rebuilt: the model loads without its HF face).

    Raises:
        LoadError: the recorded config does not build the recorded transformers class.
    """
    record = meta.get("hf_config")
    cls = None
    if isinstance(record, dict):  # the recorded class, else the config's own architectures (files without one)
        archs = record.get("architectures")
        names = [meta.get("model_class"), *(archs if isinstance(archs, list) else [])]
        cls = next((c for c in map(transformers_class, names) if c is not None), None)
    if cls is None:
        return None
    try:
        config = cls.config_class.from_dict({k: v for k, v in record.items() if k not in _NOT_CONFIG})
        with _parameters_on_meta():
            model = cls(config)
    except Exception as e:  # noqa: BLE001 - any failure of the recorded config is the file's problem
        raise LoadError(f"{source}: cannot rebuild {cls.__name__} from the recorded config: "
                        f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}") \
            from None
    share_tensors(model, gm)
    return model.eval()


def share_tensors(model: nn.Module, gm: fx.GraphModule) -> None:
    """Point ``model``'s parameters (and buffers ``gm`` holds) at ``gm``'s tensors of the same name; a tied
    parameter takes its twin's tensor. Parameters ``gm`` lacks stay on ``meta`` (a call that needs one fails)."""
    real: dict[int, torch.Tensor] = {}
    names = [(n, p) for n, p in model.named_parameters(remove_duplicate=False)]
    for name, p in names:
        t = lookup_attr(gm, name)
        if isinstance(t, torch.Tensor):
            real.setdefault(id(p), t)
    for name, p in names:
        t = lookup_attr(gm, name)
        t = t if isinstance(t, torch.Tensor) else real.get(id(p))
        if t is None:
            continue
        owner, _, leaf = name.rpartition(".")
        mod = model.get_submodule(owner) if owner else model
        mod._parameters[leaf] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
    dtype = next((t.dtype for t in gm.parameters() if t.is_floating_point()), None)
    from_config = []
    for name, b in list(model.named_buffers()):
        t = lookup_attr(gm, name)
        owner, _, leaf = name.rpartition(".")
        if isinstance(t, torch.Tensor) and t.shape == b.shape:
            (model.get_submodule(owner) if owner else model)._buffers[leaf] = t
            continue
        from_config.append(name)  # built from the config alone: frontend/eager.py may run the model with it
        if dtype is not None and b.is_floating_point() and b.dtype != dtype:
            # a buffer the graph does not hold (RoPE's original_inv_freq ...) was built in the default dtype: the
            # saved model ran in the graph's (``model.to(torch.bfloat16)`` converts every floating buffer)
            (model.get_submodule(owner) if owner else model)._buffers[leaf] = b.to(dtype)
    lrc_meta(gm)["config_buffers"] = from_config


def face_record(gm: fx.GraphModule) -> dict[str, Any]:
    """What :func:`rebuild_hf_model` needs, as the model is *now* (training may have changed its config:
    ``problem_type``, ``use_cache``): ``model_class`` and ``hf_config`` from the live model, else the trace's."""
    face = getattr(gm, "lrc_face", None)
    meta = lrc_meta(gm)
    if face is None:
        return {k: meta[k] for k in ("model_class", "hf_config") if meta.get(k) is not None}
    return model_record(face.model)
