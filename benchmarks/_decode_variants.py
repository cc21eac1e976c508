"""The rows of ``bench_decode.py``: one :class:`Variant` per engine x weights, each timing one greedy generation.

A variant's ``make(ctx)`` returns ``run(ids, new) -> (prefill s, decode s, prefill CPU s, decode CPU s)``:
prefill = prompt in, first token out; decode = the other ``new - 1`` tokens. To add a row (e.g. an int8
decoder in onnxruntime-genai), append a ``Variant`` to ``VARIANTS`` whose ``make`` builds what it needs from
``ctx`` (the model, ``ctx.tmp`` for files) and reuse :func:`genai_runner` / :func:`ort_runner`.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lowrank_compiler as lrc
from lowrank_compiler.backends.onnx.export import OrtSession
from lowrank_compiler.backends.onnx.generate import export_decoder_onnx, ort_generate

SPEC = "self_attn.*:lora(r=8, alpha=16); mlp.*:lora(r=8, alpha=16)"
Timing = tuple[float, float, float, float]
Runner = Callable[[np.ndarray, int], Timing]


def build(config: str, hidden: int, layers: int) -> torch.nn.Module:
    """A stock Llama / Qwen2 config of ``hidden`` x ``layers`` (random weights, vocab 2000, 4 heads)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                          "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[config]
    cfg = cfg_cls(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=2000, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return model_cls(cfg).eval()


@dataclass
class Context:
    """What the variants share: the base model, the lrc model with a LoRA adapter (B random, so it moves the
    output), the device, thread count and a scratch folder; ``cache`` holds exports made once per run."""
    model: torch.nn.Module
    gm: Any
    device: str
    threads: int
    tmp: Path
    cache: dict[str, Any] = field(default_factory=dict)

    def once(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]


def context(config: str, hidden: int, layers: int, device: str, threads: int, tmp: Path) -> Context:
    model = build(config, hidden, layers)
    gm = lrc.transform(copy.deepcopy(model), SPEC).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lrc.adapters(gm).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.02)
    return Context(model.to(device), gm.to(device), device, threads, tmp)


class _FirstLogits:
    """A logits processor that stamps its first call: the prompt's forward is done (end of prefill)."""

    def __init__(self) -> None:
        self.first: tuple[float, float] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            if scores.is_cuda:
                torch.cuda.synchronize()
            self.first = (time.perf_counter(), time.process_time())
        return scores


def torch_runner(model: Any, device: str) -> Runner:
    """``model.generate`` (HF, PEFT or lrc), greedy with no eos, split at the first logits processor call."""
    from transformers import LogitsProcessorList

    def run(ids: np.ndarray, new: int) -> Timing:
        x = torch.from_numpy(ids).to(device)
        stamp = _FirstLogits()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([stamp]))
        if device == "cuda":
            torch.cuda.synchronize()
        t1, c1 = time.perf_counter(), time.process_time()
        tp, cp = stamp.first or (t1, c1)
        return tp - t0, t1 - tp, cp - c0, c1 - cp
    return run


class _TimedSession:
    """An :class:`OrtSession` whose first ``run`` per generation is timestamped (lrc's own loop, unchanged)."""

    def __init__(self, sess: OrtSession) -> None:
        self.sess, self.first = sess, None
        self.session = self._sess = self  # ort_generate calls ``sess.session._sess.run`` (decode_steps.step_runner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sess, name)

    def run(self, *args: Any) -> Any:
        out = self.sess.session._sess.run(*args)
        if self.first is None:
            self.first = (time.perf_counter(), time.process_time())
        return out


def ort_session(path: Path, device: str, threads: int) -> OrtSession:
    """A session on ``threads`` threads that does not spin between runs (spinning ORT threads steal the
    cores from the engine timed next)."""
    import onnxruntime as ort

    from lowrank_compiler.backends.onnx.export import resolve_providers

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return OrtSession(ort.InferenceSession(str(path), so, providers=resolve_providers(device)))


def ort_runner(sess: OrtSession, adapter: Path | None) -> Runner:
    timed = _TimedSession(sess)

    def run(ids: np.ndarray, new: int) -> Timing:
        timed.first = None
        t0, c0 = time.perf_counter(), time.process_time()
        ort_generate(timed, ids, max_new_tokens=new, adapter=adapter)
        t1, c1 = time.perf_counter(), time.process_time()
        tp, cp = timed.first
        return tp - t0, t1 - tp, cp - c0, c1 - cp
    return run


def genai_runner(folder: Path, adapter: Path | None, device: str, threads: int) -> Runner:
    """onnxruntime-genai on ``folder`` (its session on ``threads`` threads; 0.18 has no overlay key for spinning;
    the CUDA EP for cuda)."""
    import onnxruntime_genai as og

    cfg = og.Config(str(folder))
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    if device == "cuda":
        cfg.clear_providers()
        cfg.append_provider("cuda")
    model = og.Model(cfg)
    ads = og.Adapters(model)
    if adapter is not None:
        ads.load(str(adapter), "a")

    def run(ids: np.ndarray, new: int) -> Timing:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + new, min_length=ids.shape[1] + new,
                                  batch_size=ids.shape[0])
        g = og.Generator(model, params)
        if adapter is not None:
            g.set_active_adapter(ads, "a")
        t0, c0 = time.perf_counter(), time.process_time()
        g.append_tokens(ids.astype(np.int32))  # prefill runs here
        g.generate_next_token()
        tp, cp = time.perf_counter(), time.process_time()
        while not g.is_done():
            g.generate_next_token()
        return tp - t0, time.perf_counter() - tp, cp - c0, time.process_time() - cp
    return run


# -- the exports, made once per run ---------------------------------------------------------------
def genai_folder(ctx: Context) -> Path:
    """``lrc.export(gm, format="genai")``: base graph with overridable LoRA inputs + ``adapters/task.onnx_adapter``."""
    def make() -> Path:
        out = ctx.tmp / "genai"
        lrc.export(ctx.gm.cpu(), out, format="genai", adapter_name="task", validate=False)
        ctx.gm.to(ctx.device)
        return out
    return ctx.once("genai", make)


def merged_onnx(ctx: Context) -> Path:
    def make() -> Path:
        export_decoder_onnx(lrc.merge(ctx.gm.cpu()), ctx.tmp / "merged.onnx", merge=True, validate=False)
        ctx.gm.to(ctx.device)
        return ctx.tmp / "merged.onnx"
    return ctx.once("merged", make)


def _peft(ctx: Context) -> Runner:
    from peft import PeftModel

    lrc.export(ctx.gm.cpu(), ctx.tmp / "peft", format="peft")
    ctx.gm.to(ctx.device)
    pm = PeftModel.from_pretrained(copy.deepcopy(ctx.model).cpu(), ctx.tmp / "peft").eval().to(ctx.device)
    return torch_runner(pm, ctx.device)


def _lrc_torch(ctx: Context, merged: bool) -> Runner:
    gm = lrc.merge(ctx.gm) if merged else ctx.gm
    return torch_runner(gm, ctx.device)


class _Unfolded:
    """``gm.generate(..., lrc_fold=False)``: the per-site adapter path (what a call under 32 new tokens runs)."""

    def __init__(self, gm: Any) -> None:
        self.gm = gm

    def generate(self, **kw: Any) -> Any:
        return self.gm.generate(**kw, lrc_fold=False)


def _ort(ctx: Context, which: str) -> Runner:
    if which == "merged":
        return ort_runner(ort_session(merged_onnx(ctx), ctx.device, ctx.threads), None)
    folder = genai_folder(ctx)
    sess = ctx.once("ort_genai_session", lambda: ort_session(folder / "model.onnx", ctx.device, ctx.threads))
    return ort_runner(sess, folder / "adapters" / "task.onnx_adapter" if which == "adapter" else None)


def _genai(ctx: Context, adapter: bool) -> Runner:
    folder = genai_folder(ctx)
    return genai_runner(folder, folder / "adapters" / "task.onnx_adapter" if adapter else None, ctx.device,
                        ctx.threads)


@dataclass(frozen=True)
class Variant:
    """One row: its name, engine group (for the plot), and how to build its runner."""
    name: str
    engine: str
    make: Callable[[Context], Runner]


VARIANTS: list[Variant] = [
    Variant("HF torch, base", "torch", lambda c: torch_runner(c.model, c.device)),
    Variant("PEFT, LoRA", "torch", _peft),
    Variant("lrc torch, unmerged", "torch", lambda c: _lrc_torch(c, merged=False)),
    Variant("lrc torch, unmerged, unfolded", "torch", lambda c: torch_runner(_Unfolded(c.gm), c.device)),
    Variant("lrc torch, merged", "torch", lambda c: _lrc_torch(c, merged=True)),
    Variant("lrc ORT loop, base", "ort", lambda c: _ort(c, "base")),
    Variant("lrc ORT loop, adapter", "ort", lambda c: _ort(c, "adapter")),
    Variant("lrc ORT loop, merged", "ort", lambda c: _ort(c, "merged")),
    Variant("onnxruntime-genai, base", "genai", lambda c: _genai(c, adapter=False)),
    Variant("onnxruntime-genai, adapter", "genai", lambda c: _genai(c, adapter=True)),
]
