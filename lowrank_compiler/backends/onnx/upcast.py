"""bf16 / fp16 models as float32 ONNX without an fp32 copy of their weights (issue 22).

ONNX Runtime's CPU provider has no bf16 ``Mul`` / ``MatMul``, so a low-precision model is exported as fp32.
Two steps, each over the model's own tensors:

1. :func:`fp32_compute` (fx): a graph that shares the model's tensors and computes in float32: each bf16
   parameter / buffer is cast where it is read, every ``dtype=bfloat16`` argument says float32. Tracing it
   gives the constants the fp32 model has (an SDPA scale rounded to bf16 would move the logits) and what it
   computes is the model upcast exactly (bf16 -> fp32 is exact); running it in torch is the reference.
2. :func:`float32_initializers` (ONNX IR, after ``torch.onnx.export``): each low-precision initializer
   becomes a lazy float32 tensor (upcast in row blocks when written: one block in memory, never the whole
   fp32 model), the ``Cast`` it feeds is dropped, a ``Transpose`` of it becomes a lazily transposed
   initializer (what the exporter's folding gives an fp32 model), and every remaining low-precision type
   (values, ``Cast`` targets, tensor attributes) becomes FLOAT.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.fx.node import map_aggregate

from lowrank_compiler.ir import META_KEY, adapter_nodes

_aten = torch.ops.aten
_BLOCK = 1 << 24  # bytes of float32 written per block


def low_precision(gm: fx.GraphModule) -> torch.dtype | None:
    """The floating dtype of ``gm``'s tensors other than float32 (bf16, fp16), or None for an fp32 model."""
    kinds = {t.dtype for t in (*gm.parameters(), *gm.buffers()) if t.is_floating_point()} - {torch.float32}
    return min(kinds, key=str) if kinds else None


def fp32_compute(gm: fx.GraphModule, low: torch.dtype) -> fx.GraphModule:
    """A GraphModule over ``gm``'s own parameters and submodules (no copies) whose graph computes in float32:
    a ``_to_copy(float32)`` after each ``get_attr`` of a ``low`` tensor, ``low`` replaced by float32 in every
    argument. ``gm`` is untouched; feed it float32 inputs."""
    graph = copy.deepcopy(gm.graph)
    out = fx.GraphModule(gm, graph)  # GraphModule(root, graph) refers to root's tensors and modules
    swap = (lambda a: torch.float32 if isinstance(a, torch.dtype) and a == low else a)  # noqa: E731
    for node in list(graph.nodes):
        if node.op == "get_attr":
            t = _attr(out, node.target)
            if isinstance(t, torch.Tensor) and t.dtype == low:
                with graph.inserting_after(node):
                    up = graph.call_function(_aten._to_copy.default, (node,), {"dtype": torch.float32})
                node.replace_all_uses_with(up, delete_user_cb=lambda user, up=up: user is not up)
        elif node.op in ("call_function", "call_method", "call_module"):
            node.args, node.kwargs = map_aggregate(node.args, swap), map_aggregate(node.kwargs, swap)
    graph.lint()
    out.recompile()
    return out.eval()


def fp32_sites(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` (a copy the caller owns) with each adapter site's base weight made a float32 parameter, so merging
    adds ``s·B·A`` to the exact fp32 weight (as an fp32 model would) instead of rounding the sum to bf16."""
    for node in adapter_nodes(gm):
        path = node.meta[META_KEY].weight_path
        parent, _, leaf = path.rpartition(".")
        w = gm.get_parameter(path)
        if w.is_floating_point() and w.dtype != torch.float32:
            setattr(gm.get_submodule(parent) if parent else gm, leaf, nn.Parameter(w.detach().float(), False))
    return gm


def upcast_notice(dtype: torch.dtype) -> str:
    """The one line an export of a ``dtype`` (bf16 / fp16) model prints."""
    return (f"lrc: exporting the {str(dtype).replace('torch.', '')} model as float32 ONNX (its weights upcast "
            "exactly; ONNX Runtime's CPU provider has no bf16 kernels): the file holds fp32 weights")


def _attr(root: torch.nn.Module, target: str) -> Any:
    for part in target.split("."):
        root = getattr(root, part)
    return root


def float32_inputs(values: Any, low: torch.dtype) -> Any:
    """``values`` (a pytree of tensors) with each ``low`` tensor upcast to float32 (exact)."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype == low else t, values)


def float32_initializers(model: Any) -> dict[str, int]:
    """Make ``model`` (an ``onnx_ir.Model`` from ``torch.onnx.export``) all float32, in place; returns counts
    ``{"initializers", "casts_dropped", "transposes_folded"}``. No initializer is upcast here: each is
    written by its lazy tensor (see the module docstring)."""
    import onnx_ir as ir

    low = {ir.DataType.BFLOAT16, ir.DataType.FLOAT16}
    graph = model.graph
    counts = {"initializers": 0, "casts_dropped": 0, "transposes_folded": 0}
    for value in list(graph.initializers.values()):
        if value.const_value is not None and value.const_value.dtype in low:
            value.const_value = _lazy(value.const_value, None, value.name)
            value.dtype = ir.DataType.FLOAT
            counts["initializers"] += 1
    for node in list(graph):  # an upcast weight's Cast(to=FLOAT) is now a no-op; its Transpose folds lazily
        src = node.inputs[0] if node.inputs else None
        if src is None or not src.is_initializer() or not isinstance(src.const_value, _upcast_class()):
            continue
        if node.op_type == "Cast" and node.attributes["to"].as_int() == ir.DataType.FLOAT \
                and not node.outputs[0].is_graph_output():
            node.outputs[0].replace_all_uses_with(src)
            graph.remove(node, safe=True)
            counts["casts_dropped"] += 1
    for node in list(graph):
        src = node.inputs[0] if node.inputs else None
        if node.op_type != "Transpose" or src is None or not src.is_initializer() or len(src.uses()) != 1 \
                or not isinstance(src.const_value, _upcast_class()) or node.outputs[0].is_graph_output():
            continue
        ndim = len(src.const_value.shape)
        perm = node.attributes["perm"].as_ints() if "perm" in node.attributes else range(ndim - 1, -1, -1)
        res = node.outputs[0]
        folded = ir.Value(name=res.name, type=ir.TensorType(ir.DataType.FLOAT),
                          const_value=_lazy(src.const_value.source, tuple(perm), res.name))
        folded.shape = folded.const_value.shape
        res.replace_all_uses_with(folded)
        graph.remove(node, safe=True)
        graph.register_initializer(folded)
        counts["transposes_folded"] += 1
        graph.initializers.pop(src.name)  # its one use is gone (a tied weight keeps its Transpose, as in fp32)
    _float_types(graph, low)
    return counts


@functools.cache
def _upcast_class() -> type:
    """The lazy tensor class (made on first use: ``onnx_ir`` is imported only by ONNX exports)."""
    import onnx_ir as ir

    class Upcast(ir.LazyTensor):
        """A float32 tensor of ``source`` (low precision) transposed by ``perm``, upcast when read;
        ``tofile`` writes ``_BLOCK`` bytes at a time."""

        __slots__ = ("perm", "source")

        def view(self) -> np.ndarray:
            arr = self.source.numpy()  # a torch tensor's view (ml_dtypes bfloat16) or the folded array: no copy
            return arr if self.perm is None else arr.transpose(self.perm)

        def tofile(self, file: Any) -> None:
            arr = self.view()
            rows = max(1, _BLOCK // max(1, 4 * (arr.size // arr.shape[0]))) if arr.ndim and arr.shape[0] else 0
            if not rows:
                file.write(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
                return
            for i in range(0, arr.shape[0], rows):
                file.write(np.ascontiguousarray(arr[i:i + rows], dtype=np.float32).tobytes())

    return Upcast


def _lazy(tensor: Any, perm: tuple[int, ...] | None, name: str | None) -> Any:
    """A lazy float32 ``onnx_ir`` tensor of ``tensor`` (an ``onnx_ir`` tensor, or an earlier lazy one whose
    source is taken), transposed by ``perm``."""
    import onnx_ir as ir

    cls = _upcast_class()
    src = tensor.source if isinstance(tensor, cls) else tensor
    shape = tuple(int(d) for d in src.shape)
    if perm is not None:
        shape = tuple(shape[p] for p in perm)
    out = cls(lambda: ir.tensor(np.ascontiguousarray(out.view(), dtype=np.float32)), dtype=ir.DataType.FLOAT,
              shape=ir.Shape(shape), name=name)
    out.source, out.perm = src, perm
    return out


def _float_types(graph: Any, low: set[Any]) -> None:
    """Every value typed ``low`` -> FLOAT; ``Cast(to=low)`` -> FLOAT; low tensor attributes upcast (subgraphs too)."""
    import onnx_ir as ir

    def fix(value: Any) -> None:
        if value is not None and value.dtype in low:
            value.dtype = ir.DataType.FLOAT

    for value in (*graph.inputs, *graph.outputs):
        fix(value)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for value in (*node.inputs, *node.outputs):
            fix(value)
        for key, attr in list(node.attributes.items()):
            if node.op_type == "Cast" and key == "to" and attr.as_int() in low:
                node.attributes[key] = ir.AttrInt64(key, ir.DataType.FLOAT)
            elif attr.type == ir.AttributeType.TENSOR and attr.as_tensor().dtype in low:
                arr = np.asarray(attr.as_tensor().numpy(), dtype=np.float32)
                node.attributes[key] = ir.AttrTensor(key, ir.tensor(arr, name=attr.as_tensor().name))
