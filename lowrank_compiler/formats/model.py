"""The lrc file format and its writer (no pickle): a zip of a torch.export archive (base graph + weights), a JSON
manifest (which adapter sits where) and safetensors (adapter tensors, example inputs)."""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import torch
from torch import fx

from lowrank_compiler.errors import LoadError
from lowrank_compiler.formats.rebuild import face_record
from lowrank_compiler.formats.stream import ForwardStream, write_safetensors
from lowrank_compiler.frontend.capture import export_program
from lowrank_compiler.ir import (
    META_KEY,
    AdapterMark,
    TrainOnlySDPA,
    adapter_nodes,
    lrc_meta,
)
from lowrank_compiler.passes.full import full_parameters
from lowrank_compiler.passes.pipelines import base_pipeline
from lowrank_compiler.quiet import quiet
from lowrank_compiler.safety.atomic import atomic_write

FORMAT = "lrc-model"
ADAPTER_FORMAT = "lrc-adapters"
VERSION = 1
KEPT_META = ("model_class", "hf_config", "base_model_name_or_path")  # what HF layout / PEFT export read later
MANIFEST, PROGRAM, ADAPTERS, INPUTS = "manifest.json", "program.pt2", "adapters.safetensors", "inputs.safetensors"


def adapter_records(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """One JSON-able record per adapter: site, method, args, merged flag."""
    out = []
    for node in adapter_nodes(gm):
        mark: AdapterMark = node.meta[META_KEY]
        mod = gm.get_submodule(mark.module_path)
        out.append({"site": mark.site, "method": mark.method, "args": dict(mod.config), "merged": bool(mod.merged)})
    return out


def adapter_state(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every adapter tensor (parameters and buffers), keyed by its path in ``gm``."""
    out: dict[str, torch.Tensor] = {}
    for node in adapter_nodes(gm):
        path = node.meta[META_KEY].module_path
        for k, v in gm.get_submodule(path).state_dict().items():
            out[f"{path}.{k}"] = v
    return out


@quiet
def save(gm: fx.GraphModule, path: str | os.PathLike) -> None:
    """Write ``gm`` (base graph, base weights, adapters) to one file; atomic, no pickle."""
    meta = lrc_meta(gm)
    inputs = tuple(meta.get("example_inputs") or ())
    if not inputs:
        raise LoadError("cannot save: the model was traced without example inputs; pass "
                        "example_inputs=(...) to lrc.transform so the base graph can be exported")
    base = base_pipeline()(gm).gm.eval()
    sdpa_p = [m.p for _, m in sorted(((n, m) for n, m in base.named_modules() if isinstance(m, TrainOnlySDPA)),
                                    key=lambda nm: _node_order(base, nm[0]))]
    try:
        ep = export_program(base, inputs)
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"cannot save: re-exporting the base graph failed: {type(e).__name__}: {e}") from e
    names = list(meta.get("input_names") or [f"input_{i}" for i in range(len(inputs))])
    manifest = {
        "format": FORMAT, "version": VERSION, "input_names": names, "sdpa_dropout": sdpa_p,
        "const_kwargs": {k: v for k, v in (meta.get("const_kwargs") or {}).items()
                         if isinstance(v, (int, float, str, bool, type(None)))},
        "specs": list(meta.get("specs", [])), "adapters": adapter_records(gm),
        "full_modules": list(meta.get("full_modules", [])),
        **{k: meta[k] for k in KEPT_META if meta.get(k) is not None},
        **face_record(gm),
    }

    big = sum(t.nbytes for t in [*ep.state_dict.values(), *ep.constants.values()] if isinstance(t, torch.Tensor)) \
        > 1 << 30  # zip64 headers only when the member may pass 2 GiB (small files stay byte-for-byte as before)

    def write(f: Any) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
            z.writestr(MANIFEST, json.dumps(manifest, indent=1))
            with z.open(PROGRAM, "w", force_zip64=big) as member:  # streamed: one tensor in memory at a time
                stream = ForwardStream(member)
                torch.export.save(ep, stream)
                stream.done()
            for name, tensors in ((ADAPTERS, adapter_state(gm)), (INPUTS, dict(zip(names, inputs)))):
                with z.open(name, "w", force_zip64=big) as member:
                    write_safetensors(member, tensors)

    atomic_write(path, write)
    gm.train(gm.training)


def _node_order(gm: fx.GraphModule, module_path: str) -> int:
    for i, n in enumerate(gm.graph.nodes):
        if n.op == "call_module" and n.target == module_path:
            return i
    return -1


@quiet
def save_adapters(gm: fx.GraphModule, path: str | os.PathLike) -> None:
    """Write only what training changes: the adapters (tensors + which method sits where) and the
    modules a ``full`` rule trains, as one safetensors file."""
    write_adapter_file(gm, path)


def write_adapter_file(gm: fx.GraphModule, path: str | os.PathLike, extra: dict[str, torch.Tensor] | None = None,
                       extra_meta: dict[str, str] | None = None) -> None:
    """The :func:`save_adapters` file, streamed (one tensor at a time), atomically: adapter tensors, ``full``
    modules' parameters and ``extra`` tensors, with the records (which method sits where) in the metadata."""
    meta = {"format": ADAPTER_FORMAT, "version": str(VERSION), "adapters": json.dumps(adapter_records(gm)),
            "full_modules": json.dumps(list(lrc_meta(gm).get("full_modules", []))), **(extra_meta or {})}
    state = {**adapter_state(gm), **full_parameters(gm), **(extra or {})}
    atomic_write(path, lambda f: write_safetensors(f, state, meta))


