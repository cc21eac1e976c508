"""``lrc.export``: one entry point for every deployment format (onnx, genai, pt2, safetensors, peft, pt, hf)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import fx

from lowrank_compiler.api import merge as merged_copy
from lowrank_compiler.backends.onnx.adapters import (
    check_adapter_fits,
    input_name,
    lora_adapter_tensors,
    rank_dim,
    write_onnx_adapter,
)
from lowrank_compiler.backends.onnx.export import example_inputs_of, export_onnx
from lowrank_compiler.backends.onnx.genai import export_genai
from lowrank_compiler.backends.onnx.generate import export_decoder_onnx, with_hf_face
from lowrank_compiler.backends.onnx.quantize import DEFAULT_MIN_COSINE, check_finite, export_quantized
from lowrank_compiler.backends.onnx.quantize import MODES as QUANT_MODES
from lowrank_compiler.backends.onnx.quantize_decoder import export_quantized_decoder
from lowrank_compiler.errors import ExportError, LoadError
from lowrank_compiler.formats.hf import save_hf
from lowrank_compiler.formats.load import load_adapters
from lowrank_compiler.formats.model import save, save_adapters
from lowrank_compiler.formats.peft import save_peft
from lowrank_compiler.formats.peft_load import peft_onnx_tensors
from lowrank_compiler.formats.stream import ForwardStream, write_safetensors
from lowrank_compiler.frontend.capture import export_program
from lowrank_compiler.ir import META_KEY, adapter_nodes
from lowrank_compiler.quiet import quiet
from lowrank_compiler.safety.atomic import atomic_write

FORMATS = ("onnx", "pt2", "safetensors", "peft", "pt", "hf", "genai")
_SUFFIX = {".onnx": "onnx", ".pt2": "pt2", ".safetensors": "safetensors", ".pt": "pt", ".lrc": "pt"}


def infer_format(path: str | os.PathLike, format: str | None) -> str:
    """``format`` if given (validated), else from the suffix of ``path`` (a suffix-less path means peft)."""
    if format is not None:
        if format not in FORMATS:
            raise ExportError(f"unknown format {format!r}; valid: {', '.join(FORMATS)}")
        return format
    suffix = Path(path).suffix.lower()
    if suffix in _SUFFIX:
        return _SUFFIX[suffix]
    if not suffix or str(path).endswith(("/", os.sep)):
        return "peft"
    raise ExportError(f"cannot tell the format of {str(path)!r} from its suffix; pass format= (--format), one of "
                      f"{', '.join(FORMATS)}")


@quiet
def export(gm: fx.GraphModule, path: str | os.PathLike, format: str | None = None, *, merge: bool = False,
           adapters_dir: str | os.PathLike | None = None, adapter_name: str | None = None,
           extra_adapters: list[str] | None = None, opset: int | None = None, validate: bool = True,
           quantize: str | None = None, force: bool = False, min_cosine: float | None = None,
           optimize: bool | None = None, tokenizer: str | os.PathLike | None = None,
           gate: bool = True) -> dict[str, Any]:
    """Write ``gm`` for deployment; returns a report dict (``path``, and for ONNX ``max_abs_diff`` ...).

    - ``onnx``: ``merge=True`` folds every adapter in (any method). A causal LM is exported as its
      decode graph with past key values (``lrc.backends.onnx_generate``), ready for generation. Otherwise the base graph takes each
      LoRA pair as an ONNX Runtime adapter input and the model's adapters go to
      ``<adapters_dir>/<adapter_name>.onnx_adapter`` (default: beside ``path``, named after it);
      ``extra_adapters`` (lrc adapter files or PEFT directories) are converted next to it.
    - ``genai``: an onnxruntime-genai folder (``model.onnx`` + external data, ``genai_config.json``,
      tokenizer files from ``tokenizer`` or the HF directory the model came from, and
      ``adapters/<name>.onnx_adapter`` per adapter set, written against the original base:
      ``backends/onnx/genai.py``). Causal LMs only; never inferred from a suffix.
    - ``pt2``: a ``torch.export`` archive (merged, or with the adapters inline).
    - ``safetensors``: the adapters only (``lrc.save_adapters``); with ``merge`` the merged weights.
    - ``peft``: a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
    - ``pt``: an lrc model file (``lrc.save``).
    - ``hf``: the merged model as a Hugging Face directory (``config.json`` + ``model.safetensors``) that
      ``AutoModel*.from_pretrained`` loads strictly; always merged. Never inferred from a suffix.
    Every file is written atomically: on error nothing is left behind.

    ``quantize`` (``onnx`` and ``genai``): ``"int8"`` or ``"int4"``, the base weights only (adapters stay
    fp32 and switchable). Encoders: refused below ``min_cosine`` (default 0.999) output cosine vs fp32
    unless ``force`` (``backends/onnx/quantize.py``). Causal LMs: refused when greedy decoding on held-out
    prompts (base and each adapter) falls below the mode's logits cosine (``min_cosine``) or token agreement
    vs the fp32 graph (``backends/onnx/quantize_decoder.py``); nothing is written. ``gate=False`` skips
    the decoder gate (encoders: writes even when it fails, as ``force``).

    ``optimize`` (ONNX only): ONNX Runtime graph fusions (``backends/onnx/fusions``: Attention /
    MultiHeadAttention, SkipLayerNorm, BiasGelu), kept only if they match the unfused graph on the
    example inputs. ``None`` (default): on for fp32 encoder exports, off for causal-LM decode graphs
    and quantized exports; ``True`` / ``False`` force it.

    Raises:
        ExportError: unknown format, a method the format cannot express, exporter failure.
    """
    fmt = infer_format(path, format)
    path = Path(path)
    if fmt in ("onnx", "genai"):
        gm = with_hf_face(gm)  # a loaded lrc file of an HF causal LM exports its decode graph too
    if tokenizer is not None and fmt != "genai":
        raise ExportError(f"tokenizer= is for format 'genai' (an onnxruntime-genai folder), not {fmt!r}")
    if fmt == "genai":
        if not is_causal_lm(gm):
            raise ExportError("format 'genai' needs a causal LM from Hugging Face (a *ForCausalLM model, its "
                              "lrc file or HF directory); use format 'onnx' for other models")
        if quantize is not None and quantize not in QUANT_MODES:
            raise ExportError(f"unknown quantization {quantize!r}; valid: {', '.join(QUANT_MODES)}")
        if merge or optimize:
            raise ExportError("format 'genai' writes the base and its separate adapters; drop --merge/--optimize "
                              "(or use format 'onnx')")
        if quantize is not None:
            check_finite(gm)
        extra = [(Path(src).stem, adapter_tensors_from(gm, src)) for src in extra_adapters or []]
        report = export_genai(gm, path, adapter_name=adapter_name, tokenizer=tokenizer, opset=opset,
                              validate=validate, quantize=quantize, gate=gate, force=force, min_cosine=min_cosine)
        for stem, tensors in extra:
            write_onnx_adapter(tensors, path / "adapters" / f"{stem}.onnx_adapter")
            report["adapters"].append(str(path / "adapters" / f"{stem}.onnx_adapter"))
        return report
    if fmt == "onnx":
        name = adapter_name or path.stem
        adir = Path(adapters_dir) if adapters_dir is not None else path.parent
        extra = [(Path(src).stem, adapter_tensors_from(gm, src)) for src in extra_adapters or []]  # fail early
        kw = dict(merge=merge, adapters_dir=adir, adapter_name=name, opset=opset, validate=validate)
        if is_causal_lm(gm):  # the decode graph with past key values (backends/onnx/generate.py)
            if quantize is not None:
                if optimize:
                    raise ExportError("optimize=True with quantize= is not supported for decoders: drop one of them")
                report = export_quantized_decoder(gm, path, quantize, **kw, gate=gate, force=force,
                                                  min_cosine=min_cosine)
            else:
                report = export_decoder_onnx(gm, path, **kw, optimize=bool(optimize))
        elif quantize is not None:
            if optimize:
                raise ExportError("optimize=True with quantize= is not supported yet: quantization runs on the "
                                  "unfused fp32 graph; drop one of them")

            report = export_quantized(gm, path, quantize, force=force or not gate, **kw,
                                      min_cosine=DEFAULT_MIN_COSINE if min_cosine is None else min_cosine)
        else:
            report = export_onnx(gm, path, **kw, optimize=optimize)
        for stem, tensors in extra:
            write_onnx_adapter(tensors, adir / f"{stem}.onnx_adapter")
            report["adapters"].append(str(adir / f"{stem}.onnx_adapter"))
        return report
    if optimize:
        raise ExportError(f"optimize=True needs ONNX output (format 'onnx' / a .onnx path), not {fmt!r}")
    if quantize is not None:
        raise ExportError(f"quantize={quantize!r} needs ONNX output (format 'onnx' / a .onnx path), not {fmt!r}")
    if extra_adapters:
        raise ExportError("extra adapters (--adapter) can only be converted for ONNX export")
    if fmt == "hf":
        return save_hf(gm, path)
    if fmt == "peft":
        if merge:
            raise ExportError("PEFT format holds adapters only; drop --merge (or export merged as onnx/pt2/pt)")
        save_peft(gm, path)
    elif fmt == "pt":
        save(merged_copy(gm) if merge else gm, path)
    elif fmt == "safetensors":
        _save_safetensors(gm, path, merge)
    else:
        _save_pt2(gm, path, merge)
    return {"path": str(path), "format": fmt}


def is_causal_lm(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` was transformed from an HF model that generates with a KV cache (ONNX gets the decode graph)."""
    face = getattr(gm, "lrc_face", None)
    model = getattr(face, "model", None)
    can = getattr(model, "can_generate", None)
    return bool(callable(can) and can() and "cache" in face.signature.parameters)


def adapter_tensors_from(gm: fx.GraphModule, src: str | os.PathLike) -> dict[str, Any]:
    """ONNX Runtime adapter tensors from an lrc adapter file (``lrc.save_adapters``) or a PEFT directory.

    Raises:
        ExportError: the adapter does not fit ``gm`` (names, methods or shapes).
    """

    src = Path(src)
    if src.is_dir():  # PEFT: its own rank/alpha per site; ORT accepts any rank

        try:
            tensors = peft_onnx_tensors(src)
        except LoadError as e:
            raise ExportError(str(e)) from None
        shapes: dict[str, tuple[object, ...]] = {}
        for node in adapter_nodes(gm):
            mark = node.meta[META_KEY]
            m = gm.get_submodule(mark.module_path)
            shapes[input_name(mark.site, "lora_A")] = (m.d_in, rank_dim(mark.site))
            shapes[input_name(mark.site, "lora_B")] = (rank_dim(mark.site), m.d_out)
        check_adapter_fits(shapes, tensors, str(src))
    else:
        target = copy.deepcopy(gm)
        try:
            load_adapters(target, src)
        except LoadError as e:
            raise ExportError(f"adapter {src} does not fit the model: {e}") from None
        tensors = lora_adapter_tensors(target)
    return tensors


def _save_safetensors(gm: fx.GraphModule, path: Path, merge: bool) -> None:
    """The adapters file, or with ``merge`` the merged model's tensors, streamed one tensor at a time."""
    if not merge:
        save_adapters(gm, path)
        return
    state = {k: v for k, v in merged_copy(gm).state_dict().items() if isinstance(v, torch.Tensor)}
    atomic_write(path, lambda f: write_safetensors(f, state, {"format": "pt"}))


def _save_pt2(gm: fx.GraphModule, path: Path, merge: bool) -> None:
    """A ``torch.export`` archive streamed into the file (no whole-archive bytes in memory)."""
    inputs, _ = example_inputs_of(gm)
    was = gm.training
    target = (merged_copy(gm) if merge else gm).eval()
    try:
        ep = export_program(target, inputs)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"torch.export failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}") from None
    finally:
        gm.train(was)

    def write(f: Any) -> None:
        stream = ForwardStream(f)
        torch.export.save(ep, stream)
        stream.done()

    atomic_write(path, write)
