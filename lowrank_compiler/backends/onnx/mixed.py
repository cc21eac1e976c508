"""One ONNX graph for mixed-adapter batches: an ``adapter_ids`` input and every site's K adapters as
stacked, overridable weights, so one ONNX Runtime ``Run()`` serves rows with different adapters.

The stacks have the mixed graph's fixed capacity and rank (zero-padded), so adding an adapter or changing
one is new values for the same inputs (``mixed_feeds`` / an ``.onnx_adapter`` file of them), never a
re-export. Names: ``<site>.mixed.A`` [K+1, d_in, r], ``<site>.mixed.B`` [K+1, r, d_out] and, with DoRA
members, ``<site>.mixed.gain`` [K+1, d_out]; the last slot is the base model (``adapter_ids`` −1).
FLoRA sites expose their per-row adapters instead: ``<site>.mixed.flora_in`` / ``.flora_out``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from lowrank_compiler.adapter_sets.mixed import refresh
from lowrank_compiler.backends.onnx.export import _to_onnx, example_inputs_of, session
from lowrank_compiler.errors import ExportError
from lowrank_compiler.passes.mixed import mixed_nodes
from lowrank_compiler.safety.atomic import atomic_write


def stack_name(site: str, which: str) -> str:
    return f"{site}.mixed.{which}"


def _owners(mod: Any) -> dict[str, Any]:
    """``{name: module holding it}`` of one site's tensors that become overridable inputs: the stacked
    buffers, or a FLoRA member's per-row adapter parameters (``flora_in`` / ``flora_out``)."""
    if mod.native:
        return {n: mod.members[0] for n, _ in mod.members[0].named_parameters()}
    return {n: mod for n in ("A", "B", "gain") if n != "gain" or mod.has_gain}


def _stacks(mod: Any) -> dict[str, torch.Tensor]:
    return {n: getattr(owner, n) for n, owner in _owners(mod).items()}


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return np.ascontiguousarray((t.float() if t.dtype == torch.bfloat16 else t).numpy())


def mixed_feeds(mgm: fx.GraphModule) -> dict[str, np.ndarray]:
    """``{input name: array}`` of every site's current stacks (refreshed from its adapters first): feed
    them to a session, or write them with ``write_onnx_adapter``, to serve the adapters as they are now."""

    refresh(mgm)
    return {stack_name(mark.site, k): _numpy(t) for _, mark, mod in mixed_nodes(mgm) for k, t in _stacks(mod).items()}


def export_mixed_onnx(mgm: fx.GraphModule, path: str | os.PathLike, *, opset: int | None = None,
                      validate: bool = True) -> dict[str, Any]:
    """Write the mixed graph ``mgm`` (from ``lrc.adapter_sets.mixed_batch``) as ONNX; returns ``{path, inputs, outputs,
    stacked_inputs, max_abs_diff}``. The stacks are graph inputs whose initializer defaults are the
    adapters at export time.

    Raises:
        ExportError: ``mgm`` is not a mixed graph, has no example inputs, or the exporter failed.
    """
    import onnx
    from onnx import helper, numpy_helper

    nodes = mixed_nodes(mgm)
    if not nodes:
        raise ExportError("not a mixed-adapter graph: build one with lrc.adapter_sets.mixed_batch(gm, [...]) first")
    inputs, names = example_inputs_of(mgm)
    real = mixed_feeds(mgm)
    # distinct placeholder tensors while exporting: the exporter merges equal initializers (zeros, ones),
    # and it reads tensors lazily, so the placeholders are new objects swapped in, never written in place
    gen = torch.Generator().manual_seed(0)
    saved, placeholders = [], {}
    try:
        for _, mark, mod in nodes:
            saved.append((mod, "hold", mod.hold))
            mod.hold = True  # keep the placeholders: no refresh while exporting
            for which, owner in _owners(mod).items():
                old = getattr(owner, which)
                ph = torch.rand(old.shape, generator=gen).to(old.dtype) + 0.5
                placeholders[(mark.site, which)] = _numpy(ph).copy()
                saved.append((owner, which, old))
                if isinstance(old, torch.nn.Parameter):
                    owner._parameters[which] = torch.nn.Parameter(ph, requires_grad=old.requires_grad)
                else:
                    owner._buffers[which] = ph
        with torch.no_grad():
            model = _to_onnx(mgm, inputs, names, opset)
    finally:
        for owner, which, old in reversed(saved):
            if which == "hold":
                owner.hold = old
            elif isinstance(old, torch.nn.Parameter):
                owner._parameters[which] = old
            else:
                owner._buffers[which] = old
    found: dict[str, tuple[str, str]] = {}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        for key, ph in placeholders.items():
            if arr.shape == ph.shape and np.array_equal(arr, ph):
                found[init.name] = key
    missing = set(placeholders) - set(found.values())
    if missing:
        raise ExportError(f"the exported graph lost the stacked adapter weights {sorted(missing)[:3]} "
                          "(constant-folded by the exporter); please report this with the model")
    for init in model.graph.initializer:
        if init.name not in found:
            continue
        new = stack_name(*found[init.name])
        for node in model.graph.node:
            for j, name in enumerate(node.input):
                if name == init.name:
                    node.input[j] = new
        arr = real[new]
        init.CopyFrom(numpy_helper.from_array(arr, new))
        model.graph.input.append(helper.make_tensor_value_info(new, init.data_type, list(arr.shape)))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"the exported model fails onnx.checker: {str(e).strip().splitlines()[0][:300]}") from None
    data = model.SerializeToString()
    path = Path(path)
    atomic_write(path, lambda f: f.write(data))
    report: dict[str, Any] = {"path": str(path), "inputs": names, "outputs": [o.name for o in model.graph.output],
                              "stacked_inputs": sorted(real)}
    if validate:
        report["max_abs_diff"] = _validate(path, mgm, inputs, names)
    return report


def _validate(path: Path, mgm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], names: list[str]) -> float:
    sess = session(path, providers="cpu")
    was = mgm.training
    mgm.eval()
    with torch.no_grad():
        ref = [t.numpy() for t in tree_flatten(mgm(*inputs))[0] if isinstance(t, torch.Tensor)]
    mgm.train(was)
    got = sess(dict(zip(names, inputs)))
    return max(float(np.abs(np.asarray(g, np.float64) - r).max()) if r.size else 0.0 for g, r in zip(got, ref))
