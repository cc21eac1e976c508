"""Lower a GraphModule to ONNX (merged, or with LoRA weights as swappable ORT adapter inputs) and run it.

Exporter choice: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), the default
since torch 2.9. It takes our GraphModules directly (aten graphs from torch.export and fx graphs alike),
keeps named dynamic ``batch``/``seq`` dims, and ORT fuses its output fully (SkipLayerNorm, BiasGelu,
FusedMatMul). The legacy TorchScript exporter is deprecated and loses the SkipLayerNorm fusion
(ONNX_FACTS §3).
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path

from lowrank_compiler import ir
from lowrank_compiler.backends.onnx.adapters import (
    GAIN,
    adapter_input_renames,
    check_adapter_fits,
    is_rank_dim,
    lora_adapter_tensors,
    make_lora_inputs,
    read_onnx_adapter,
    write_onnx_adapter,
)
from lowrank_compiler.backends.onnx.fusions import optimize as ort_optimize
from lowrank_compiler.backends.onnx.upcast import (
    float32_initializers,
    float32_inputs,
    fp32_compute,
    fp32_sites,
    low_precision,
    upcast_notice,
)
from lowrank_compiler.errors import ExportError
from lowrank_compiler.frontend.capture import dynamic_dims
from lowrank_compiler.ir import META_KEY, adapter_nodes, frozen_shared_copy
from lowrank_compiler.passes.pipelines import base_pipeline, merge_pipeline, separate_pipeline
from lowrank_compiler.safety.atomic import atomic_write

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
_GPU_HINT = "install the `gpu` extra, which replaces onnxruntime: pip uninstall -y onnxruntime && pip install 'lowrank-compiler[gpu]'"


# -- providers / sessions -----------------------------------------------------------------------
def _gpu_present() -> bool:
    return torch.cuda.is_available() or os.path.exists("/dev/nvidia0") or os.path.exists("/dev/dxg")


def resolve_providers(providers: str | list[str] | tuple[str, ...] = "auto") -> list[str]:
    """ORT execution providers for ``"auto"`` (CUDA when onnxruntime-gpu and a GPU are present, then CPU),
    ``"cpu"``, ``"cuda"``, or an explicit list of provider names.

    Raises:
        ExportError: CUDA (or another provider) was asked for and this onnxruntime / machine lacks it.
    """
    import onnxruntime as ort

    avail = list(ort.get_available_providers())
    if isinstance(providers, str):
        key = providers.lower()
        if key == "auto":
            return ([CUDA] if CUDA in avail and _gpu_present() else []) + [CPU]
        if key == "cpu":
            return [CPU]
        if key == "cuda":
            providers = [CUDA, CPU]
        else:
            raise ExportError(f"unknown providers {providers!r}; valid: 'auto', 'cpu', 'cuda' or a list of ORT provider names")
    wanted = list(providers)
    missing = [p for p in wanted if p not in avail]
    if CUDA in missing:
        raise ExportError(f"CUDA execution provider requested but this onnxruntime {ort.__version__} has only "
                          f"{avail}; {_GPU_HINT}")
    if CUDA in wanted and not _gpu_present():
        raise ExportError("CUDA execution provider requested but no GPU is visible (no CUDA device); use providers='cpu'")
    if missing:
        raise ExportError(f"execution provider(s) {missing} not available; this onnxruntime has {avail}")
    return wanted + ([CPU] if CPU not in wanted else [])


class OrtSession:
    """An ``onnxruntime.InferenceSession`` (every attribute is forwarded) plus LoRA adapter switching.

    ``sess(feeds, adapter="a.onnx_adapter")`` runs with that adapter active; ``adapter=None`` runs
    the base model (the LoRA inputs fall back to their r=0 defaults). Loaded adapters and their
    ``RunOptions`` are cached per path, so switching costs nothing after the first use.
    """

    def __init__(self, sess: Any) -> None:
        self.session = sess
        self._adapters: dict[str, tuple[Any, Any]] = {}
        self._lora_shapes: dict[str, tuple[object, ...]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def lora_inputs(self) -> dict[str, tuple[object, ...]]:
        """``{name: dims}`` of the overridable LoRA inputs and DoRA gains (empty for a merged model)."""
        if self._lora_shapes is None:
            self._lora_shapes = {i.name: tuple(i.shape) for i in self.session.get_overridable_initializers()
                                 if any(is_rank_dim(d) for d in i.shape) or i.name.endswith(f".{GAIN}.weight")}
        return self._lora_shapes

    def run_options(self, adapter: str | os.PathLike | None) -> Any:
        """The cached ``RunOptions`` that activates ``adapter`` (a plain one for ``None``)."""
        import onnxruntime as ort

        key = "" if adapter is None else str(Path(adapter).resolve())
        if key not in self._adapters:
            ro = ort.RunOptions()
            la = None
            if adapter is not None:
                tensors = read_onnx_adapter(adapter)
                check_adapter_fits(self.lora_inputs(), tensors, str(adapter))
                la = ort.LoraAdapter()
                la.Load(str(adapter))
                ro.add_active_adapter(la)
            self._adapters[key] = (la, ro)
        return self._adapters[key][1]

    def __call__(self, feeds: dict[str, Any], adapter: str | os.PathLike | None = None,
                 output_names: list[str] | None = None) -> list[np.ndarray]:
        feeds = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in feeds.items()}
        return self.session.run(output_names, feeds, self.run_options(adapter))


def session(path: str | os.PathLike, providers: str | list[str] = "auto", threads: int | None = None,
            optimization: str = "all", log_severity: int = 3) -> OrtSession:
    """An ORT session on ``path`` with graph optimizations on (``"all"``, ``"extended"``, ``"basic"``, ``"off"``).

    ``threads`` sets intra-op threads. Raises ExportError for a missing file or an unavailable provider.
    """
    import onnxruntime as ort

    if not Path(path).is_file():
        raise ExportError(f"{path}: no such ONNX model file")
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    if optimization not in levels:
        raise ExportError(f"unknown optimization {optimization!r}; valid: {', '.join(levels)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimization]
    so.log_severity_level = log_severity  # silences the expected "initializer appears in graph inputs" warnings
    if threads:
        so.intra_op_num_threads = threads
    provs = resolve_providers(providers)
    try:
        sess = ort.InferenceSession(str(path), so, providers=provs)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{path}: ONNX Runtime could not load it: {str(e).strip().splitlines()[0]}") from None
    if CUDA in provs and CUDA not in sess.get_providers():
        raise ExportError(f"CUDA execution provider requested but ONNX Runtime fell back to {sess.get_providers()}; "
                          "check the CUDA/cuDNN libraries onnxruntime-gpu needs")
    return OrtSession(sess)


# -- export --------------------------------------------------------------------------------------
class _Flat(nn.Module):
    """``forward(*inputs) -> tuple of tensors``: the graph's (HF) output object flattened for ONNX."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves, _ = tree_flatten(self.gm(*inputs))
        return tuple(t for t in leaves if isinstance(t, torch.Tensor))


def output_names(out: Any) -> list[str]:
    """ONNX output names from the pytree paths of a sample output (``last_hidden_state``, ``pooler_output``...)."""
    names = []
    for path, leaf in tree_flatten_with_path(out)[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        name = "".join(c if c.isalnum() or c == "_" else "_" for c in keystr(path)).strip("_") or "output"
        while "__" in name:
            name = name.replace("__", "_")
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names or ["output"]


def _dynamic_shapes(inputs: tuple[torch.Tensor, ...]) -> tuple[tuple[dict[int, Any], ...]]:
    return (dynamic_dims(inputs, named=True),)  # _Flat takes *inputs: one positional group


def example_inputs_of(gm: fx.GraphModule) -> tuple[tuple[torch.Tensor, ...], list[str]]:
    """(example inputs, input names) recorded at trace time; ExportError if there are none."""
    inputs, names = ir.example_inputs(gm)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ExportError("the model has no recorded example inputs; trace it with example_inputs=(...) "
                          "(lrc.transform(..., example_inputs=...)) or pass example_inputs= to export")
    return inputs, names


def _to_onnx(module: fx.GraphModule, inputs: tuple[torch.Tensor, ...], names: list[str], opset: int | None,
             low: torch.dtype | None = None) -> Any:
    """torch.onnx.export (dynamo) → in-memory ModelProto with dynamic batch/seq; ``low``: ``module`` computes
    in fp32 over tensors of this dtype (``upcast.fp32_compute``), whose initializers become float32."""
    module = module.eval()
    flat = _Flat(module).eval()  # eval on the top-level wrapper too (ONNX_FACTS §3 gotcha)
    try:
        with torch.no_grad():
            outs = output_names(module(*inputs))
    except Exception as e:  # noqa: BLE001  (a graph that cannot run on its own example inputs)
        raise ExportError(f"the graph to export fails on its example inputs: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(flat, inputs, None, input_names=names, output_names=outs, opset_version=opset,
                                     dynamic_shapes=_dynamic_shapes(inputs), dynamo=True, external_data=False,
                                     optimize=True, verbose=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}") from None
    if low is not None:
        float32_initializers(prog.model)
    return prog.model_proto


def export_onnx(gm: fx.GraphModule, path: str | os.PathLike, *, merge: bool = True,
                adapters_dir: str | os.PathLike | None = None, adapter_name: str = "default",
                opset: int | None = None, validate: bool = True,
                example_inputs: tuple[torch.Tensor, ...] | None = None, optimize: bool | None = False) -> dict[str, Any]:
    """Write ``gm`` as an ONNX model; returns a report ``{path, inputs, outputs, adapters, max_abs_diff}``.

    ``merge=True``: every adapter (any method) is folded into its weight. ``merge=False``: the base
    graph with each LoRA pair as an overridable input (``<site>.lora_A.weight`` [d_in, <site>.lora_r],
    ``<site>.lora_B.weight`` [<site>.lora_r, d_out], r=0 defaults = base model), and this model's own adapters
    written to ``<adapters_dir>/<adapter_name>.onnx_adapter``. Both are ``onnx.checker``-clean with
    dynamic ``batch``/``seq`` axes. ``validate`` runs ORT on the example inputs and reports the max
    absolute difference to torch; without ``merge`` it also runs a random non-zero adapter
    (:func:`probe_adapters`) and reports ``probe_effect``, how far that adapter moved the outputs.
    ``optimize`` fuses the graph for ONNX Runtime (attention, LayerNorm, GELU; ``backends/onnx/fusions``),
    checked against the unfused graph on the example inputs; its report is ``report["optimize"]``.
    ``optimize=None`` fuses fp32 graphs only (ORT's fused kernels and the numpy check are fp32).
    A bf16 / fp16 model is written as float32 (ORT's CPU provider has no bf16 kernels; weights upcast
    exactly, constants as the fp32 model's; one line says so), checked against the model computed in fp32.
    The file appears only when everything succeeded.

    Raises:
        ExportError: no example inputs, a method with no x·A·B form in separate mode, exporter failure.
    """
    import onnx

    inputs, names = example_inputs_of(gm)
    if example_inputs is not None:
        inputs = tuple(example_inputs)
    if len(inputs) != len(names):
        raise ExportError(f"{len(inputs)} example inputs for {len(names)} graph inputs {names}")
    path = Path(path)
    low = low_precision(gm)
    if low is not None:
        print(upcast_notice(low), file=sys.stderr)
    renames: dict[str, tuple[str, int | None]] = {}
    if merge:  # a bf16 model's adapted weights merge in fp32, as the fp32 model's would
        target = merge_pipeline()(fp32_sites(frozen_shared_copy(gm)) if low else frozen_shared_copy(gm)).gm
    else:
        target = separate_pipeline(placeholder_seed=0)(gm).gm  # distinct random values: no initializer dedup (ONNX_FACTS §5)
        renames = adapter_input_renames(gm, target)
    if low is not None:
        target = fp32_compute(target, low)
    model = _to_onnx(target, float32_inputs(inputs, low) if low else inputs, names, opset, low)
    if renames:
        model = make_lora_inputs(model, renames)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"the exported model fails onnx.checker: {str(e).strip().splitlines()[0][:300]}") from None
    fusion_report = None
    all_fp32 = all(t.dtype == torch.float32 for t in (*gm.parameters(), *gm.buffers(), *inputs) if t.is_floating_point())
    if optimize and not all_fp32:
        raise ExportError("optimize=True needs an fp32 model and inputs (ORT's fused kernels are fp32 here); "
                          "export with optimize=False or cast the model to float32")
    if optimize is None:
        optimize = all_fp32
    if optimize:
        model, fusion_report = ort_optimize(model, feeds=dict(zip(names, (t.numpy() for t in inputs))))
    data = model.SerializeToString()
    adapter_tensors = lora_adapter_tensors(gm) if (not merge and adapter_nodes(gm)) else {}
    report: dict[str, Any] = {"path": str(path), "inputs": names, "outputs": [o.name for o in model.graph.output],
                              "lora_inputs": sorted(v[0] for v in renames.values()), "adapters": [],
                              "dtype": "float32", "source_dtype": str(low or torch.float32).replace("torch.", "")}
    if fusion_report is not None:
        report["optimize"] = fusion_report
    tmp_model = path.with_name(f".{path.name}.validate.tmp")
    try:
        tmp_model.parent.mkdir(parents=True, exist_ok=True)
        tmp_model.write_bytes(data)
        adapter_path = None
        if adapter_tensors and adapters_dir is not None:
            adapter_path = Path(adapters_dir) / f"{adapter_name}.onnx_adapter"
            write_onnx_adapter(adapter_tensors, adapter_path)
            report["adapters"].append(str(adapter_path))
        if validate:
            report["max_abs_diff"] = _validate(tmp_model, gm, inputs, names, adapter_tensors, adapter_path, merge)
            if not merge and adapter_tensors:  # the model's own adapter may be zero (B=0): also check a random one
                probe = probe_adapters(gm)
                diff = _validate(tmp_model, probe, inputs, names, lora_adapter_tensors(probe), None, False)
                report["max_abs_diff"] = max(report["max_abs_diff"], diff)
                report["probe_effect"] = _output_change(probe, gm, inputs)
        atomic_write(path, lambda f: f.write(data))
    except BaseException:
        if report["adapters"]:
            Path(report["adapters"][0]).unlink(missing_ok=True)
        raise
    finally:
        tmp_model.unlink(missing_ok=True)
    return report


def probe_adapters(gm: fx.GraphModule, seed: int = 0) -> fx.GraphModule:
    """A copy of ``gm`` whose trainable adapter tensors are random and non-zero (seeded): validating
    ORT against it proves the adapter inputs are wired, which a fresh B=0 adapter cannot."""
    probe = copy.deepcopy(gm)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for node in adapter_nodes(probe):
            for p in probe.get_submodule(node.meta[META_KEY].module_path).parameters():
                if p.requires_grad and p.is_floating_point():
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.1)
    return probe


def _output_change(a: fx.GraphModule, b: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> float:
    """Max |a(x) − b(x)| over every output: how much the probe adapter moves the outputs."""
    outs = []
    for m in (a, b):
        was = m.training
        m.eval()
        with torch.no_grad():
            outs.append([t for t in tree_flatten(m(*inputs))[0] if isinstance(t, torch.Tensor)])
        m.train(was)
    return max(float((x - y).abs().max()) if x.numel() else 0.0 for x, y in zip(*outs))


def _validate(model_path: Path, gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], names: list[str],
              adapter_tensors: dict[str, np.ndarray], adapter_path: Path | None, merged: bool) -> float:
    """Max |ORT − torch| over every output on the example inputs (with the adapter active if there is one);
    a bf16 / fp16 ``gm`` is computed in fp32 (``upcast.fp32_compute``), as its float32 file is."""

    sess = session(model_path, providers="cpu")
    low = low_precision(gm)
    if low is not None:
        inputs = float32_inputs(inputs, low)
    feeds = dict(zip(names, (t.numpy() for t in inputs)))
    was = gm.training
    gm.eval()
    with torch.no_grad():
        graph = gm if merged or adapter_tensors else base_pipeline()(gm).gm
        if low is not None:
            graph = fp32_compute(graph, low)
        ref = [t.numpy() for t in tree_flatten(graph(*inputs))[0] if isinstance(t, torch.Tensor)]
    gm.train(was)
    if adapter_path is not None:
        got = sess(feeds, adapter=adapter_path)
    elif adapter_tensors:
        got = sess({**feeds, **adapter_tensors})
    else:
        got = sess(feeds)
    return max(float(np.abs(np.asarray(g, np.float64) - r).max()) if r.size else 0.0 for g, r in zip(got, ref))
