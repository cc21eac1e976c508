"""Every ``torch.export`` call of lrc: one model call signature -> a mode-switchable GraphModule.

``export_call`` traces one call of a model (positional names, keyword values, baked constants) and
``export_program`` exports a whole module for saving; both go through :func:`_torch_export`, the one
``torch.export.export`` call site. ``dynamic_dims`` decides dynamic sizes for trace, save, pt2 and ONNX export.
"""

from __future__ import annotations

import inspect
import json
import keyword
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from lowrank_compiler.errors import TraceError
from lowrank_compiler.frontend import trace_cache
from lowrank_compiler.frontend.hierarchy import lookup_attr
from lowrank_compiler.ir import lrc_meta
from lowrank_compiler.passes.mode import make_mode_switchable

_ROOT = "m"  # attribute of the binding wrapper that holds the user's model


def default_inputs(model: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Dummy inputs for an HF model from its config: ``input_ids`` [2, 16] (+ ``attention_mask``)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    vocab = int(getattr(cfg, "vocab_size", None) or 100)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 16), generator=g)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs = {"attention_mask": torch.ones(2, 16, dtype=torch.long)} if "attention_mask" in params else {}
    return (ids,), kwargs


def model_record(model: nn.Module) -> dict[str, Any]:
    """What the HF layout export needs later: the model's class name and (for HF models) its config."""
    config = getattr(model, "config", None)
    rec: dict[str, Any] = {"model_class": type(model).__name__}
    if hasattr(config, "to_json_string"):  # JSON-able, so lrc.save can keep it
        rec["hf_config"] = json.loads(config.to_json_string(use_diff=False))
    return rec


class LrcBinding(nn.Module):
    """The module torch.export traces: ``forward(name1, ...)`` (generated per call signature) calls the model
    with those inputs and the call's non-tensor values ``consts``."""

    consts: dict[str, Any]

    def __init__(self, consts: dict[str, Any]) -> None:
        super().__init__()
        self.consts = consts


def _binding_wrapper(model: nn.Module, names: list[str], n_pos: int, consts: dict[str, Any]) -> nn.Module:
    """A module whose forward(name1, name2, ...) calls model(pos..., kw=..., **consts)."""
    for n in names:
        if not n.isidentifier() or keyword.iskeyword(n):
            raise TraceError(f"input name {n!r} is not a Python identifier")
    call = ", ".join(names[:n_pos] + [f"{n}={n}" for n in names[n_pos:]])
    src = f"def forward(self, {', '.join(names)}):\n    return self.{_ROOT}({call}, **self.consts)\n"
    ns: dict[str, Any] = {}
    exec(compile(src, "<lrc-binding>", "exec"), ns)  # our own generated source, identifiers only
    wrapper = type("LrcBinding", (LrcBinding,), {"forward": ns["forward"]})(consts)
    setattr(wrapper, _ROOT, model)
    return wrapper


def _positional_names(model: nn.Module, n: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params[:n]]
    except (TypeError, ValueError):
        names = []
    return names + [f"input_{i}" for i in range(len(names), n)]


def dynamic_dims(inputs: tuple[torch.Tensor, ...], named: bool = False) -> tuple[dict[int, Any], ...]:
    """Which dims of each input are dynamic: batch (dim 0) and, for 2-D/3-D inputs, sequence (dim 1).

    ``named=False`` gives ``Dim.AUTO`` (torch.export decides, no upper bound to break on models with short
    position tables); ``named=True`` gives shared ``Dim("batch")``/``Dim("seq")`` (named ONNX axes).
    The one place that decides this for trace, save, pt2 and ONNX export.
    """
    batch, seq = (torch.export.Dim("batch"), torch.export.Dim("seq")) if named else (None, None)
    out = []
    for t in inputs:
        dims = (0, 1) if t.dim() in (2, 3) else (0,) if t.dim() >= 1 else ()
        out.append({d: (torch.export.Dim.AUTO if not named else batch if d == 0 else seq) for d in dims})
    return tuple(out)


def export_program(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """``torch.export.export`` (non-strict) of ``module`` on ``inputs`` with :func:`dynamic_dims`: lrc's one call."""
    return _torch_export(module, tuple(inputs), dynamic_dims(tuple(inputs)))


def _torch_export(module: nn.Module, args: tuple[Any, ...], dynamic_shapes: Any) -> torch.export.ExportedProgram:
    """The one ``torch.export.export`` call (non-strict)."""
    return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)


def register_cache_pytrees() -> None:
    """Let torch.export take and return transformers' ``DynamicCache`` (transformers' own registration)."""
    try:
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except ImportError:  # no transformers, or one without cache export support
        return
    register_dynamic_cache_export_support()


def export_call(model: nn.Module, names: list[str], values: list[Any], consts: dict[str, Any],
                n_pos: int = 0, dims: Callable[[torch.Tensor], dict[int, Any]] | None = None,
                root: nn.Module | None = None, cache: bool | None = None) -> fx.GraphModule:
    """``torch.export`` (non-strict, eval mode) of ``model(names[:n_pos]..., name=value..., **consts)``.

    ``values`` may be pytrees (a ``DynamicCache``); every tensor leaf gets the dynamic dims
    ``dims(t)`` (default: every dim ``Dim.AUTO``, so sizes the model fixes specialise). get_attr
    targets resolve against ``root`` (default the model) and, for constants export lifted, the
    exported module. The result is a mode-switchable GraphModule whose forward takes ``values``.
    The program comes from the trace cache when it holds this trace (:mod:`.trace_cache`; ``cache``,
    default: ``root``'s recorded ``trace_cache`` choice, else ``$LRC_TRACE_CACHE``).
    """
    register_cache_pytrees()
    dims = dims or (lambda t: {d: torch.export.Dim.AUTO for d in range(t.dim())})
    wrapper = _binding_wrapper(model, names, n_pos, consts)
    shapes = torch.export.ShapesCollection()
    choices = []
    for leaf in tree_flatten(list(values))[0]:
        if isinstance(leaf, torch.Tensor) and leaf.dim():
            choice = dims(leaf)
            shapes[leaf] = choice
            choices.append(choice)
    if cache is None and root is not None:
        cache = lrc_meta(root).get("trace_cache") if isinstance(root, fx.GraphModule) else None
    was_training = model.training
    model.eval()  # eval-mode trace: matches eager exactly; the mode pass restores train-time dropout
    quiet = logging.getLogger("torch._export.non_strict_utils")  # "0/1 specialized" notes: expected, guarded
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    label = f"{type(model).__name__} ({', '.join(list(names) + [f'{k}={v!r}' for k, v in consts.items()])})"
    try:
        return trace_cache.exported(
            wrapper, label,
            lambda: trace_cache.call_key(model, names, values, consts, n_pos, choices),
            lambda: _torch_export(wrapper, tuple(values), shapes.dynamic_shapes(wrapper, tuple(values))),
            lambda ep: trace_cache.fits(ep, values),
            lambda ep: _graph_module(ep, model, root, names, consts, was_training), cache)
    finally:
        model.train(was_training)
        quiet.setLevel(level)


def _graph_module(ep: torch.export.ExportedProgram, model: nn.Module, root: nn.Module | None, names: list[str],
                  consts: dict[str, Any], was_training: bool) -> fx.GraphModule:
    """The mode-switchable GraphModule of ``ep``: model tensors resolved against ``root``, lifted constants kept."""
    em = ep.module(check_guards=False)
    graph, prefix = em.graph, _ROOT + "."
    found: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        short = node.target[len(prefix):] if node.target.startswith(prefix) else node.target
        if lookup_attr(model, short) is not None:  # a model tensor: the root's (a later graph's root may hold a new one)
            obj = lookup_attr(root if root is not None else model, short)
            if obj is None:  # a tensor the root lacks (a buffer a rebuilt model computed): the model's own
                obj = lookup_attr(model, short)
        else:  # a constant the export lifted: its name is per-export, so make it unique under the root
            obj = lookup_attr(em, node.target)
            base, i = short, 0
            while (root is not None and lookup_attr(root, short) is not None) or short in found:
                i += 1
                short = f"{base}_{i}"
        if obj is None:
            raise TraceError(f"exported graph references {node.target!r}, which neither the model nor the export holds")
        node.target = short
        found[short] = obj
    gm = fx.GraphModule(found, graph)
    gm.meta.update({k: v for k, v in em.meta.items() if k != "lrc"})
    make_mode_switchable(gm, _sdpa_dropout(model, gm))
    gm.train(was_training)
    lrc_meta(gm).update(trace="export", input_names=list(names), const_kwargs=dict(consts),
                        model_class=type(model).__name__)
    return gm


def export_model(model: nn.Module, args: tuple, kwargs: dict, was_training: bool,
                 cache: bool | None = None) -> fx.GraphModule:
    """The primary graph of ``model`` traced on ``args``/``kwargs`` (tensor kwargs become inputs, others constants)."""
    tensor_kw = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    consts = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise TraceError("example_inputs must all be tensors; pass other values in example_kwargs")
    names = _positional_names(model, len(args)) + list(tensor_kw)
    inputs = tuple(args) + tuple(tensor_kw.values())
    gm = export_call(model, names, list(inputs), consts, n_pos=len(args), dims=lambda t: dynamic_dims((t,))[0],
                     cache=cache)
    gm.train(was_training)
    lrc_meta(gm).update(example_inputs=inputs, example_kwargs={}, **model_record(model))
    return gm


_P_FLOAT_ATTRS = ("attention_dropout", "dropout_prob", "attn_dropout_p", "attention_probs_dropout_prob")
_P_MODULE_ATTRS = ("attn_dropout", "dropout", "attention_dropout")


def _sdpa_dropout(model: nn.Module, gm: fx.GraphModule) -> dict[str, float]:
    """Attention-dropout p for each SDPA node, read from the module that called it."""
    out: dict[str, float] = {}
    for node in gm.graph.nodes:
        if node.target is not torch.ops.aten.scaled_dot_product_attention.default:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            continue
        path = list(stack.values())[-1][0]
        path = path[len(_ROOT) + 1:] if path.startswith(_ROOT + ".") else path
        try:
            owner = model.get_submodule(path) if path != _ROOT else model
        except AttributeError:
            continue
        out[node.name] = _owner_p(owner)
    return out


def _owner_p(owner: nn.Module) -> float:
    for attr in _P_FLOAT_ATTRS:
        v = getattr(owner, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    for attr in _P_MODULE_ATTRS:
        v = getattr(owner, attr, None)
        if isinstance(v, nn.Dropout):
            return float(v.p)
    return 0.0
