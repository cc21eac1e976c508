"""The transformed model keeps the original's face: every call style, vs PEFT holding the same adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.decoder import SPECS, batch, make_decoder
from torch.utils._pytree import tree_flatten

import lowrank_compiler as lrc
from lowrank_compiler.api import trainable_parameters

TOL = 1e-5


def _bert() -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=64)
    return tf.BertModel(cfg).eval()


def _pair(model: torch.nn.Module, spec: str, tmp_path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(lrc model with non-zero adapters, PEFT model loaded from lrc's PEFT export of the same adapters)."""
    from peft import PeftModel

    base = copy.deepcopy(model)
    gm = lrc.transform(model, spec)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lrc.adapters(gm).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    lrc.export(gm, tmp_path / "peft", format="peft")
    return gm.eval(), PeftModel.from_pretrained(base, tmp_path / "peft").eval()


def _tensors(out) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _same(a, b) -> float:
    ta, tb = _tensors(a), _tensors(b)
    assert len(ta) == len(tb) and len(ta) > 0, (len(ta), len(tb))
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(ta, tb))


def _styles(ids: torch.Tensor, mask: torch.Tensor, lm: bool, token_types: bool) -> dict[str, tuple[tuple, dict]]:
    b2 = batch(n=3, seq=5, seed=4)
    b1 = batch(n=1, seq=7, seed=5)
    tok = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        tok["token_type_ids"] = torch.zeros_like(ids)
    styles = {
        "positional ids": ((ids,), {}),
        "keyword ids + mask": ((), {"input_ids": ids, "attention_mask": mask}),
        "**tokenizer output": ((), tok),
        "mask omitted": ((), {"input_ids": ids}),
        "bool mask": ((ids,), {"attention_mask": mask.bool()}),
        "int32 ids": ((), {"input_ids": ids.int(), "attention_mask": mask}),
        "return_dict=False": ((ids,), {"attention_mask": mask, "return_dict": False}),
        "output_hidden_states": ((ids,), {"attention_mask": mask, "output_hidden_states": True}),
        "output_attentions": ((ids,), {"attention_mask": mask, "output_attentions": True}),
        "other batch and seq": ((), dict(b2)),
        "batch of one": ((), dict(b1)),
    }
    if lm:
        styles["labels"] = ((), {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return styles


def _check_matrix(gm, pm, ids, mask, lm: bool, token_types: bool) -> dict[str, float]:
    diffs = {}
    with torch.no_grad():
        for name, (args, kwargs) in _styles(ids, mask, lm, token_types).items():
            try:
                ref = pm(*args, **kwargs)
            except Exception:  # noqa: BLE001 - a style the original model does not accept is not in the matrix
                continue
            diffs[name] = _same(gm(*args, **kwargs), ref)
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, bad
    assert len(diffs) >= 9, sorted(diffs)
    return diffs


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_call_matrix_from_configs(kind, tmp_path):
    model = _bert() if kind == "bert" else make_decoder(kind)
    spec = "attention.self.*:lora(r=4, alpha=8); intermediate.dense:lora(r=4, alpha=8)" if kind == "bert" \
        else SPECS[kind][0]
    gm, pm = _pair(model, spec, tmp_path)
    b = batch(n=2, seq=9, seed=2)
    diffs = _check_matrix(gm, pm, b["input_ids"], b["attention_mask"], lm=kind != "bert", token_types=kind == "bert")
    with torch.no_grad(), pm.disable_adapter():  # the adapters matter: the comparison proves something
        assert _same(gm(**b), pm(**b)) > 1e-3
    if kind != "bert":
        assert "labels" in diffs


@pytest.mark.slow
def test_call_matrix_real_minilm(minilm, minilm_batch, tmp_path):
    model, tok = minilm
    gm, pm = _pair(copy.deepcopy(model), "attention.self.*:lora(r=4, alpha=8)", tmp_path)
    ids, mask = minilm_batch
    _check_matrix(gm, pm, ids, mask, lm=False, token_types=True)
    enc = tok(["a user calls it with the tokenizer's output", "short"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert _same(gm(**enc), pm(**enc)) <= TOL


def test_face_attributes_and_signature(capsys):
    import inspect

    model = make_decoder("llama")
    gm = lrc.transform(model, SPECS["llama"][0])
    assert gm.config is model.config and gm.generation_config is model.generation_config
    assert gm.device.type == "cpu" and gm.dtype == torch.float32
    line = gm.print_trainable_parameters()
    t, a = trainable_parameters(gm)
    assert line == f"trainable params: {t:,} || all params: {a:,} || trainable%: {100 * t / a:.4f}"
    assert "labels" in inspect.signature(gm.forward).parameters  # tools that filter batch columns keep labels
    capsys.readouterr()
    gm(**batch(seed=1), output_hidden_states=True)
    gm(**batch(seed=2), output_hidden_states=True)
    err = capsys.readouterr().err
    assert err.count("lrc: tracing") == 1  # traced once, announced once
    c = copy.deepcopy(gm)
    assert type(c).__mro__[1] is type(gm).__mro__[1] and c.config is model.config


def test_variants_follow_the_primary(tmp_path):
    """A variant shares the primary's adapters and weights: training, merging and rewrites are seen by all."""
    model = make_decoder("gpt2")
    gm = lrc.transform(model, SPECS["gpt2"][0])
    b = batch(seed=3)
    with torch.no_grad():
        before = gm(b["input_ids"]).logits  # a variant (no mask)
        for m in lrc.adapters(gm).values():
            m.lora_B.fill_(0.05)
        after = gm(b["input_ids"]).logits
        assert (after - before).abs().max() > 1e-3
        lrc.merge(gm, keep_adapters=True)
        assert (gm(b["input_ids"]).logits - after).abs().max() < 1e-5
        lrc.unmerge(gm)
        merged = lrc.merge(gm)
        assert (merged(b["input_ids"]).logits - after).abs().max() < 1e-5
        assert not lrc.adapters(merged) and lrc.adapters(gm)


def test_hf_trainer_with_labels(tmp_path):
    """HF Trainer, batches carrying labels, default optimizer: it trains the transformed model unchanged."""
    from transformers import Trainer, TrainingArguments

    model = make_decoder("gpt2")
    gm = lrc.transform(model, SPECS["gpt2"][0])
    b = batch(n=4, seed=0)
    rows = [{"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i],
             "labels": b["input_ids"][i].masked_fill(b["attention_mask"][i] == 0, -100)} for i in range(4)]
    base = {n: p.detach().clone() for n, p in gm.named_parameters() if not p.requires_grad}
    gm.eval()
    with torch.no_grad():
        full = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        loss0 = float(gm(**full).loss)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True)
    Trainer(model=gm, args=args, train_dataset=rows * 8).train()
    gm.eval()
    with torch.no_grad():
        loss1 = float(gm(**full).loss)
    assert loss1 < loss0 - 0.05, (loss0, loss1)
    assert all(torch.equal(p, base[n]) for n, p in gm.named_parameters() if n in base)
