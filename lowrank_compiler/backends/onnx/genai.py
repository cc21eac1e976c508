"""onnxruntime-genai folders: ``model.onnx`` (+ external data), ``genai_config.json``, tokenizer, one
``.onnx_adapter`` per adapter set.

The graph is the decode graph of :mod:`.generate` with the ORIGINAL base weights (a LoRA-GA offset is
undone) and every LoRA input overridable, so "no adapter" is the base model and each adapter file is
written against the same base: LoRA, VeRA (Λ_d A, Λ_b B), AdaLoRA (its kept ranks) as they are, LoRA-GA
in its rank-2r form ([A; A0], [B, −B0]). DoRA and DoRA-FA carry their per-output-channel gain
g = m / ‖W + s·B A‖ (precomputed: inference weights are fixed) as ``<site>.dora_gain.weight``: every
site where some set is DoRA computes ``g ⊙ (W x + x A B) + b`` in the graph, with g's default ones, so
the base graph and the other sets' files are unchanged. ``og.Adapters(model).load(file, name)`` then
``generator.set_active_adapter(adapters, name)`` switches between them per generator.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

from lowrank_compiler.adapter_sets.named import adapter_names, named_adapter_modules
from lowrank_compiler.backends.onnx.adapters import GAIN, LORA_A, LORA_B, input_name, write_onnx_adapter
from lowrank_compiler.backends.onnx.generate import export_decoder_onnx, unmerged_copy
from lowrank_compiler.backends.onnx.quantize_decoder import quantize_decoder
from lowrank_compiler.errors import ExportError
from lowrank_compiler.ir import META_KEY, adapter_nodes, logical_weight, lrc_meta
from lowrank_compiler.methods.base import AdapterMethod, LowRank
from lowrank_compiler.safety.atomic import atomic_dir

MODEL_FILE, CONFIG_FILE = "model.onnx", "genai_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")


def current_weights(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """``{site: the base weight torch runs every adapter set on}`` (the active adapter unmerged; a LoRA-GA
    offset kept, as torch keeps it)."""
    out = {}
    with torch.no_grad():
        for node in adapter_nodes(gm):
            mark = node.meta[META_KEY]
            mod, w = gm.get_submodule(mark.module_path), logical_weight(gm, mark)
            out[mark.site] = mod.unmerged_weight(w) if mod.merged else w
    return out


def _factors(site: str, mod: AdapterMethod, weight: torch.Tensor | None) -> tuple[LowRank, torch.Tensor | None]:
    """(``(A', B', s)`` against the original base, DoRA's gain over ``weight`` or None)."""
    f = mod.original_base_factors()
    if f is not None:
        return f, None
    mixed = mod.mixed_factors(weight) if weight is not None and mod.base_offset() is None else None
    if mixed is None or mixed.gain is None:
        raise ExportError(f"site {site!r} uses {mod.name!r}, which has no x·A·B (or DoRA) form against the original "
                          "base for an .onnx_adapter; export it merged instead (`lrc export MODEL --merge -o lm.onnx`)")
    return LowRank(mixed.A, mixed.B, 1.0), mixed.gain


def adapter_set_tensors(mods: dict[str, AdapterMethod], offsets: dict[str, LowRank] | None = None,
                        weights: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """``{input name: array}`` of one adapter set against the ORIGINAL base: A' as [d_in, r'], s·B' as [r', d_out],
    and for DoRA the gain m / ‖W + s·B A‖ [d_out] over ``weights[site]`` (see :func:`current_weights`).

    ``offsets``: the low-rank change another set made to a site's shared base (a LoRA-GA set's
    ``−s·B0 A0``), appended to the sets that did not make it, since torch runs them on the changed base
    (a DoRA gain multiplies it too, as torch's ``m/‖V‖ ⊙ (W_now x + s·B A x)`` does).

    Raises:
        ExportError: a site whose method has no ``x·A·B`` (or DoRA) form against the original base.
    """
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for site, mod in mods.items():
            f, gain = _factors(site, mod, (weights or {}).get(site))
            a = f.A.detach().float().t()
            b = (f.B.detach().float() * float(f.scale)).t()
            off = (offsets or {}).get(site)
            if off is not None and mod.base_offset() is None:
                a = torch.cat([a, off.A.detach().float().t()], 1)
                b = torch.cat([b, -(off.B.detach().float() * float(off.scale)).t()], 0)
            out[input_name(site, LORA_A)] = a.contiguous().numpy()
            out[input_name(site, LORA_B)] = b.contiguous().numpy()
            if gain is not None:
                out[input_name(site, GAIN)] = gain.detach().float().contiguous().numpy()
    return out


def genai_config(model_cfg: Any, gen_cfg: Any, inputs: list[str], shapes: dict[str, list[Any]]) -> dict[str, Any]:
    """``genai_config.json`` for the decode graph: names and cache sizes read from the graph, ids and search
    defaults from the HF config and ``generation_config``."""
    n_layers = sum(1 for n in inputs if n.startswith("past.") and n.endswith(".key"))
    kv_heads, head_size = (int(d) for d in (shapes["past.0.key"][1], shapes["past.0.key"][3]))
    heads = int(getattr(model_cfg, "num_attention_heads", kv_heads))
    context = int(getattr(model_cfg, "max_position_embeddings", 0) or 2048)
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask",
             "past_key_names": "past.%d.key", "past_value_names": "past.%d.value"}
    if "position_ids" in inputs:
        names["position_ids"] = "position_ids"

    def ident(key: str, default: int) -> int:
        v = getattr(gen_cfg, key, None) if gen_cfg is not None else None
        v = getattr(model_cfg, key, None) if v is None else v
        v = v[0] if isinstance(v, (list, tuple)) and v else v
        return int(default if v is None else v)

    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    eos = getattr(model_cfg, "eos_token_id", None) if eos is None else eos
    search = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "temperature": 1.0, "top_k": 50,
              "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "min_length": 0,
              "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "early_stopping": True,
              "past_present_share_buffer": False, "max_length": context}
    for key in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams"):
        v = getattr(gen_cfg, key, None) if gen_cfg is not None else None
        if v is not None:
            search[key] = type(search.get(key, 0))(v)
    return {"model": {
        "type": str(getattr(model_cfg, "model_type", "llama")), "vocab_size": int(model_cfg.vocab_size),
        "context_length": context, "bos_token_id": ident("bos_token_id", 1),
        "eos_token_id": [int(e) for e in eos] if isinstance(eos, (list, tuple)) else ident("eos_token_id", 2),
        "pad_token_id": ident("pad_token_id", 0),
        "decoder": {"filename": MODEL_FILE, "head_size": head_size,
                    "hidden_size": int(getattr(model_cfg, "hidden_size", heads * head_size)),
                    "num_attention_heads": heads, "num_hidden_layers": n_layers, "num_key_value_heads": kv_heads,
                    "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                    "inputs": names,
                    "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                "present_value_names": "present.%d.value"}}},
        "search": search}


def tokenizer_source(gm: fx.GraphModule, tokenizer: str | os.PathLike | None) -> Path | None:
    """The folder whose tokenizer files are copied: ``tokenizer`` if given, else the HF directory the model
    came from (``base_model_name_or_path`` / ``config._name_or_path``) when it exists locally."""
    if tokenizer is not None:
        p = Path(tokenizer)
        if not p.is_dir():
            raise ExportError(f"tokenizer={str(p)!r} is not a directory; pass an HF model/tokenizer folder")
        return p
    face = getattr(gm, "lrc_face", None)
    cfg = getattr(getattr(face, "model", None), "config", None)
    for cand in (lrc_meta(gm).get("base_model_name_or_path"), getattr(cfg, "_name_or_path", None)):
        if cand and Path(str(cand)).is_dir():
            return Path(str(cand))
    return None


def export_genai(gm: fx.GraphModule, out_dir: str | os.PathLike, *, adapter_name: str | None = None,
                 tokenizer: str | os.PathLike | None = None, opset: int | None = None,
                 validate: bool = True, quantize: str | None = None, gate: bool = True, force: bool = False,
                 min_cosine: float | None = None) -> dict[str, Any]:
    """Write an onnxruntime-genai folder for the causal LM ``gm``; returns ``{path, format, adapters, ...}``.

    ``quantize`` (``"int8"`` / ``"int4"``): ``model.onnx`` holds the quantized base and is gated with every
    adapter file active (:mod:`.quantize_decoder`; ``gate``, ``force``, ``min_cosine`` as there); the
    adapter files stay fp32, the same as for the fp32 folder.

    Each adapter set of ``gm`` (the active one named ``adapter_name`` or its own name, and every named
    set of ``lrc.adapter_sets``) becomes ``<out_dir>/adapters/<name>.onnx_adapter``. The folder is written
    atomically (``safety/atomic.py``): on error the old folder, if any, is unchanged.

    Raises:
        ExportError: not an HF causal LM, or an adapter with neither an x·A·B nor a DoRA form (FLoRA, ...).
    """
    face = getattr(gm, "lrc_face", None)
    model = getattr(face, "model", None)
    if model is None or not hasattr(model, "config"):
        raise ExportError("format 'genai' needs a causal LM transformed from (or saved from) a Hugging Face model")
    sets: dict[str, dict[str, np.ndarray]] = {}
    if adapter_nodes(gm):
        names = adapter_names(gm)
        by_set = {name: named_adapter_modules(gm, name) for name in names}
        offsets = {site: off for mods in by_set.values() for site, mod in mods.items()
                   if (off := mod.base_offset()) is not None}
        weights = current_weights(gm)
        for name, mods in by_set.items():
            label = adapter_name if (name == names[0] and adapter_name) else name
            sets[label] = adapter_set_tensors(mods, offsets, weights)
    gain_sites = {k.rsplit(".", 2)[0] for t in sets.values() for k in t if k.endswith(f".{GAIN}.weight")}
    tok = tokenizer_source(gm, tokenizer)
    base = unmerged_copy(gm, original=True)
    report: dict[str, Any] = {"path": str(out_dir), "format": "genai", "adapters": []}

    def fill(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(dir=tmp) as scratch:  # the exporter's own adapter file goes here
            fp32 = Path(scratch) / MODEL_FILE if quantize else tmp / MODEL_FILE
            rep = export_decoder_onnx(base, fp32, merge=False, adapters_dir=scratch, opset=opset,
                                      external_data=True, validate=validate, gain_sites=gain_sites)
            for label, tensors in sets.items():
                (tmp / "adapters").mkdir(exist_ok=True)
                write_onnx_adapter(tensors, tmp / "adapters" / f"{label}.onnx_adapter")
            if quantize:
                files = [str(tmp / "adapters" / f"{label}.onnx_adapter") for label in sets]
                report.update(quantize_decoder(fp32, tmp / MODEL_FILE, quantize, adapters=files, gate=gate,
                                               force=force, min_cosine=min_cosine, external_data=True))
        if "max_abs_diff" in rep:
            report["max_abs_diff"] = rep["max_abs_diff"]
        import onnx

        proto = onnx.load(str(tmp / MODEL_FILE), load_external_data=False)
        shapes = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
        cfg = genai_config(model.config, getattr(model, "generation_config", None), rep["inputs"], shapes)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        copied = []
        for name in TOKENIZER_FILES if tok is not None else ():
            if (tok / name).is_file():
                shutil.copyfile(tok / name, tmp / name)
                copied.append(name)
        report["tokenizer"] = copied

    atomic_dir(out_dir, fill)
    report["adapters"] = [str(Path(out_dir) / "adapters" / f"{label}.onnx_adapter") for label in sets]
    return report


def is_genai_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with a ``genai_config.json`` (written by ``lrc export MODEL --format genai -o DIR``)."""
    return (Path(path) / CONFIG_FILE).is_file()


def bos_to_add(folder: str | os.PathLike) -> int | None:
    """The BOS id the folder's HF tokenizer puts before a text (``add_bos_token`` in ``tokenizer_config.json``,
    else a ``tokenizer.json`` post-processor that names the BOS token, as transformers 5 saves Llama's), or
    None (Qwen2, GPT-2: no BOS)."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        model = json.loads((folder / CONFIG_FILE).read_text()).get("model", {})
    except (OSError, ValueError):
        return None
    bos = cfg.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    add = cfg.get("add_bos_token")
    if add is None and isinstance(bos, str) and bos and (folder / "tokenizer.json").is_file():
        try:
            post = json.loads((folder / "tokenizer.json").read_text()).get("post_processor")
        except (OSError, ValueError):
            post = None
        add = post is not None and bos in json.dumps(post)
    bos_id = model.get("bos_token_id")
    return int(bos_id) if add and isinstance(bos_id, int) else None


def genai_available() -> bool:
    """Whether the ``onnxruntime-genai`` package is installed (the ``genai`` extra)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


class GenaiRunner:
    """One ``og.Model`` of a genai folder with its adapters loaded by name; ``generate`` runs one generator."""

    def __init__(self, folder: str | os.PathLike) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise ExportError("running a genai folder needs onnxruntime-genai (pip install 'lowrank-compiler[genai]'); "
                              "or pass --engine ort to use lrc's own ONNX Runtime loop") from None
        if not is_genai_folder(folder):
            raise ExportError(f"{folder} has no {CONFIG_FILE}; write one with `lrc export MODEL --format genai -o DIR`")
        self.og, self.folder = og, Path(folder)
        try:
            self.model = og.Model(str(folder))
        except Exception as e:  # noqa: BLE001  (og raises RuntimeError with its own text)
            raise ExportError(f"onnxruntime-genai could not open {folder}: {str(e).strip().splitlines()[0][:200]}") \
                from None
        self.adapters = og.Adapters(self.model)
        self.loaded: dict[str, str] = {}
        self.vocab_size = int(json.loads((self.folder / CONFIG_FILE).read_text())["model"]["vocab_size"])

    def adapter(self, spec: str | os.PathLike) -> str:
        """Load ``spec`` (an ``.onnx_adapter`` path, or a name under ``<folder>/adapters/``) once; its name."""
        p = Path(spec)
        if not p.is_file():
            p = self.folder / "adapters" / f"{spec}.onnx_adapter"
        if not p.is_file():
            have = sorted(q.stem for q in (self.folder / "adapters").glob("*.onnx_adapter"))
            raise ExportError(f"no adapter {str(spec)!r}: not a file, and {self.folder}/adapters has only {have}")
        key = str(p.resolve())
        if key not in self.loaded:
            name = f"a{len(self.loaded)}"
            try:
                self.adapters.load(key, name)
            except Exception as e:  # noqa: BLE001
                raise ExportError(f"onnxruntime-genai refused adapter {p}: {str(e).strip().splitlines()[0][:200]}") \
                    from None
            self.loaded[key] = name
        return self.loaded[key]

    def tokenizer(self) -> Any:
        """The folder's tokenizer (``og.Tokenizer``); ExportError when the folder has none."""
        if not (self.folder / "tokenizer.json").is_file() and not (self.folder / "tokenizer.model").is_file():
            raise ExportError(f"{self.folder} has no tokenizer files; text prompts need them (export from an HF "
                              "directory, or `lrc export MODEL --format genai --tokenizer HF_DIR -o DIR`)")
        try:
            return self.og.Tokenizer(self.model)
        except Exception as e:  # noqa: BLE001  (og raises RuntimeError, e.g. "Unsupported tokenizer class")
            raise ExportError(f"onnxruntime-genai cannot use the tokenizer in {self.folder}: "
                              f"{str(e).strip().splitlines()[0][:160]}; pass token ids with --input input_ids=FILE.npy") \
                from None

    def encode(self, tok: Any, text: str) -> list[int]:
        """``text``'s ids as the HF tokenizer gives them (``tokenizer(text).input_ids``): onnxruntime-genai's
        ``Tokenizer.encode`` adds no special tokens, so the BOS id is prepended when the HF tokenizer adds
        one (:func:`bos_to_add`)."""
        ids = [int(t) for t in tok.encode(text)]
        bos = bos_to_add(self.folder)
        return [bos, *ids] if bos is not None and ids[:1] != [bos] else ids

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, adapter: str | os.PathLike | None = None, *,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
                 seed: int | None = None) -> list[list[int]]:
        """Prompt + new tokens for each row of ``input_ids`` [batch, seq] (rows of equal length).

        ``do_sample``: temperature / top-k (0: no top-k filter, as HF) / top-p with ``seed``, as genai's search
        options. genai draws from its own random generator: the same seed gives the same tokens, but not
        the tokens torch's seeded ``generate`` samples (lrc's own loop, ``ort_generate``, gives those)."""
        ids = np.asarray(input_ids, dtype=np.int32)
        params = self.og.GeneratorParams(self.model)
        opts: dict[str, Any] = {"max_length": int(ids.shape[1] + max_new_tokens), "do_sample": bool(do_sample),
                                "batch_size": int(ids.shape[0])}
        if do_sample:
            opts.update(temperature=float(temperature), top_p=float(top_p))
            opts["top_k"] = int(top_k) if top_k else self.vocab_size  # unset, genai keeps the folder's default
            if seed is not None:
                opts["random_seed"] = int(seed)
        params.set_search_options(**opts)
        gen = self.og.Generator(self.model, params)
        if adapter is not None:
            gen.set_active_adapter(self.adapters, self.adapter(adapter))
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()
        return [list(map(int, gen.get_sequence(i))) for i in range(ids.shape[0])]
