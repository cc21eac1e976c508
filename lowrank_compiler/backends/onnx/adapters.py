"""ONNX Runtime native LoRA: adapter weights as overridable graph inputs, ``.onnx_adapter`` files.

DoRA (and DoRA-FA) sites also take ``<site>.dora_gain.weight`` [d_out], the per-output-channel
multiplier m / ‖W + s·B A‖ (fixed once the weights are, so computed at export): the graph computes
``g ⊙ (W x + (x A) B) + b`` and the input's default is ones, so with no adapter the graph is the base.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
import torch
from torch import fx

from lowrank_compiler.errors import ExportError
from lowrank_compiler.ir import META_KEY, adapter_nodes, logical_weight
from lowrank_compiler.passes.separate import GAIN, LORA_A, LORA_B, onnx_adapter_tensors
from lowrank_compiler.safety.atomic import atomic_write

LORA_R = "lora_r"  # the symbolic rank dimension (Olive / onnxruntime-genai name) ...


def rank_dim(site: str) -> str:
    """... made per site (``<site>.lora_r``): ORT's memory planner treats equal dim_params as equal
    sizes, so one shared ``lora_r`` breaks adapters whose sites have different ranks."""
    return f"{site}.{LORA_R}"


def is_rank_dim(d: object) -> bool:
    return isinstance(d, str) and d.endswith(LORA_R)


def input_name(site: str, which: str) -> str:
    """The ONNX input that carries one LoRA matrix: ``<site>.lora_A.weight`` (Olive's names, MatMul layout),
    or a DoRA site's gain ``<site>.dora_gain.weight``."""
    return f"{site}.{which}.weight"


def adapter_input_renames(gm: fx.GraphModule, separated: fx.GraphModule,
                          prefix: str = "gm.") -> dict[str, tuple[str, int | None]]:
    """``{exported initializer name: (input name, rank axis)}`` for :func:`make_lora_inputs`: each adapter
    site of ``gm`` (before the separate pass) gives ``lora_A`` (axis 1) and ``lora_B`` (axis 0), and a
    ``dora_gain`` (axis None) where ``separated`` (after it) holds one; ``prefix``: the export wrapper's."""
    renames: dict[str, tuple[str, int | None]] = {}
    for node in adapter_nodes(gm):
        mp, site = node.meta[META_KEY].module_path, node.meta[META_KEY].site
        for which, axis in ((LORA_A, 1), (LORA_B, 0), (GAIN, None)):
            if which != GAIN or hasattr(separated.get_submodule(mp), GAIN):
                renames[f"{prefix}{mp}.{which}"] = (input_name(site, which), axis)
    return renames


def lora_adapter_tensors(gm: fx.GraphModule, dtype: np.dtype | None = None) -> dict[str, np.ndarray]:
    """``{input name: array}`` for every adapter of ``gm``: A as [d_in, r], s·B as [r, d_out] and, for
    DoRA, the gain m / ‖W + s·B A‖ as [d_out] (over the unmerged base weight).

    Raises:
        ExportError: an adapter is neither LoRA-family (``x·A·B``) nor DoRA-family.
    """
    out: dict[str, np.ndarray] = {}
    for node in adapter_nodes(gm):
        mark = node.meta[META_KEY]
        method = gm.get_submodule(mark.module_path)
        with torch.no_grad():
            w = logical_weight(gm, mark)
            found = onnx_adapter_tensors(method, method.unmerged_weight(w) if method.merged else w)
        if found is None:
            raise ExportError(f"site {mark.site!r} uses {mark.method!r}, which has no x·A·B (or DoRA) form for an "
                              ".onnx_adapter; export it merged (`--merge`) instead")
        for which, t in zip((LORA_A, LORA_B, GAIN), found):
            if t is None:
                continue
            arr = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
            out[input_name(mark.site, which)] = np.ascontiguousarray(arr.astype(dtype) if dtype else arr)
    return out


def write_onnx_adapter(tensors: dict[str, np.ndarray], path: str | os.PathLike, adapter_version: int = 1) -> None:
    """Write ``tensors`` as an ONNX Runtime ``.onnx_adapter`` file (atomic: temp file + rename).

    Raises:
        ExportError: a floating tensor with NaN/inf entries (e.g. a scale that overflows float16); nothing
        is written, so a reader never meets a non-finite adapter lrc wrote.
    """
    import onnxruntime as ort

    bad = [k for k, v in tensors.items() if np.issubdtype(np.asarray(v).dtype, np.floating)
           and not np.isfinite(v).all()]
    if bad:
        raise ExportError(f"{path}: adapter tensor(s) {bad[:4]} have NaN/inf entries; not written")

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(adapter_version)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})

    def write(f: object) -> None:  # AdapterFormat writes by path: export beside, then stream into the temp file
        tmp = Path(path).parent / f".{Path(path).name}.{secrets.token_hex(4)}.export.tmp"  # stale ones: see safewrite
        try:
            fmt.export_adapter(str(tmp))
            f.write(tmp.read_bytes())  # type: ignore[attr-defined]
        finally:
            tmp.unlink(missing_ok=True)

    atomic_write(path, write)


def read_onnx_adapter(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of an ``.onnx_adapter`` file; ExportError if it is missing or not one."""
    import onnxruntime as ort

    p = Path(path)
    if not p.is_file():
        raise ExportError(f"{p}: no such adapter file")
    try:
        rd = ort.AdapterFormat.read_adapter(str(p))
    except Exception as e:  # noqa: BLE001
        reason = str(e).strip().splitlines()[0].rsplit(") ", 1)[-1]
        raise ExportError(f"{p} is not an ONNX Runtime .onnx_adapter file ({reason})") from None
    # copy while `rd` is alive: the OrtValues' numpy views point into its (mmapped) buffer
    try:
        out = {k: np.array(v.numpy(), copy=True) for k, v in rd.get_parameters().items()}
    except Exception as e:  # noqa: BLE001  (ORT raises its own types on odd element types)
        raise ExportError(f"{p}: unreadable adapter tensors ({str(e).strip().splitlines()[0][:160]})") from None
    bad = [f"{k}: dtype {v.dtype}" for k, v in out.items() if not np.issubdtype(v.dtype, np.floating)]
    bad += [f"{k}: has NaN/inf entries" for k, v in out.items()
            if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
    if bad:
        raise ExportError(f"{p}: bad adapter tensors (floating point and finite expected): " + "; ".join(bad[:4]))
    return out


def check_adapter_fits(shapes: dict[str, tuple[object, ...]], tensors: dict[str, np.ndarray], source: str) -> None:
    """Raise one ExportError listing every adapter tensor whose name or shape the model does not take."""
    problems = [f"unknown input {k!r}" for k in tensors if k not in shapes]
    for k, v in tensors.items():
        if k in shapes:
            want = shapes[k]
            if len(want) != v.ndim or any(not is_rank_dim(w) and w != s for w, s in zip(want, v.shape)):
                problems.append(f"{k}: shape {tuple(v.shape)} does not fit {want}")
    present = {k.rsplit(".", 2)[0] for k in tensors}
    problems += [f"{s}: has only one of lora_A/lora_B" for s in sorted(present)
                 if sum(input_name(s, w) in tensors for w in (LORA_A, LORA_B)) == 1]
    if problems:
        hint = f"; the model takes e.g. {sorted(shapes)[:2]}" if shapes else "; the model has no LoRA inputs"
        raise ExportError(f"{source}: adapter does not fit the model: " + "; ".join(problems[:5])
                          + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "") + hint)


def make_lora_inputs(model: object, renames: dict[str, tuple[str, int | None]]) -> object:
    """Turn initializers into overridable LoRA inputs with r=0 defaults (ONNX_FACTS §1, approach B).

    ``renames``: ``{initializer name: (input name, rank axis)}``. Each initializer becomes a graph
    input ``[d_in, '<site>.lora_r']`` / ``['<site>.lora_r', d_out]`` plus a same-name zero-size initializer, so no
    adapter means the base output; a DoRA gain (rank axis None) becomes an input [d_out] whose default
    is ones. Only the value_info that carries the traced rank is dropped
    (dropping all of it breaks ORT's SkipLayerNorm fusion).
    """
    from onnx import helper, numpy_helper

    g = model.graph  # type: ignore[attr-defined]
    found = set()
    for init in g.initializer:
        old = init.name
        if old not in renames:
            continue
        new, axis = renames[old]
        arr = numpy_helper.to_array(init)
        dims: list[object] = list(arr.shape)
        if axis is None:  # a gain: fixed shape, default ones
            default = np.ones(arr.shape, arr.dtype)
        else:
            dims[axis] = rank_dim(new.rsplit(".", 2)[0])
            zshape = list(arr.shape)
            zshape[axis] = 0
            default = np.zeros(zshape, arr.dtype)
        g.input.append(helper.make_tensor_value_info(new, init.data_type, dims))
        init.CopyFrom(numpy_helper.from_array(default, new))
        found.add(old)
    missing = sorted(set(renames) - found)
    if missing:
        raise ExportError(f"the exported graph lost LoRA weights {missing[:3]} (constant-folded or merged by the "
                          "exporter); please report this with the model")
    old_to_new = {k: v[0] for k, v in renames.items()}
    rank_outputs = set()
    for node in g.node:
        for j, name in enumerate(node.input):
            if name in old_to_new:
                node.input[j] = old_to_new[name]
                if renames[name][1] == 1:
                    rank_outputs.update(node.output)
    keep = [vi for vi in g.value_info if vi.name not in rank_outputs]
    del g.value_info[:]
    g.value_info.extend(keep)
    return model
