"""Adapters-only checkpoints: ``gm.save_pretrained`` / ``lrc.adapter_sets.from_pretrained`` (PEFT's layout where
PEFT holds the methods, lrc's otherwise), the HF Trainer's checkpoints, and ``load_adapter`` of directories.

References: PEFT loading the same directory, the saved model's own outputs, an uninterrupted Trainer run.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import trainer as th
from helpers.common import tiny_bert_classifier
from helpers.mlp import batch, inputs, make_mlp

import lowrank_compiler as lrc

peft = pytest.importorskip("peft")


def _train(gm, steps: int = 3) -> None:
    opt = lrc.optimizer(gm, lr=1e-2)
    gm.train()
    for i in range(steps):
        x, y = batch(i)
        torch.nn.functional.mse_loss(gm(x), y).backward()
        opt.step()
        opt.zero_grad()
    gm.eval()


def test_lora_with_head_is_peft_layout_and_round_trips(tmp_path):
    model, ids, kw = tiny_bert_classifier()
    base = copy.deepcopy(model)
    gm = lrc.transform(model, "attention.self.*:lora(r=4, alpha=8); classifier:full")
    with torch.no_grad():
        for mod in lrc.adapters(gm).values():
            mod.lora_B.normal_(0, 0.2)
        gm.classifier.weight.add_(0.5)
    x = {"input_ids": ids, "attention_mask": kw["attention_mask"]}
    with torch.no_grad():
        want = gm(**x).logits
    assert gm.save_pretrained(tmp_path / "ad") == {"default": "peft"}
    files = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad").eval()
    back = lrc.adapter_sets.from_pretrained(copy.deepcopy(base), tmp_path / "ad").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(**x).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(**x).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(back(**x, labels=kw["labels"]).loss, gm(**x, labels=kw["labels"]).loss)
    n_adapter = (tmp_path / "ad" / "adapter_model.safetensors").stat().st_size
    n_base = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    assert n_adapter < n_base / 10


@pytest.mark.parametrize("spec", ["fc*:dora(r=4, alpha=8)", "fc*:vera(r=8, d_init=0.1)",
                                  "fc1:delta_lora(r=4); fc3:lora(r=2, dropout=0.1); fc2:full"])
def test_other_methods_are_lrc_layout_and_round_trip(tmp_path, spec):
    gm = lrc.transform(make_mlp(), spec, example_inputs=(inputs(),))
    _train(gm)
    x = inputs(seed=7)
    with torch.no_grad():
        want = gm(x)
    assert gm.save_pretrained(tmp_path / "ad") == {"default": "lrc"}
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["lrc_adapter_config.json",
                                                                   "lrc_adapter_model.safetensors"]
    back = lrc.adapter_sets.from_pretrained(make_mlp(), tmp_path / "ad", example_inputs=(inputs(),)).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), want, rtol=0, atol=0)
    assert lrc.save_adapters is not None and [r for r in lrc.adapters(back)] == [r for r in lrc.adapters(gm)]


def test_loraga_base_offset_is_recomputed_exactly(tmp_path):
    data = [(batch(i)[0],) for i in range(2)]
    gm = lrc.transform(make_mlp(), "fc*:loraga(r=2, alpha=4)", example_inputs=(inputs(),), data=data,
                       loss_fn=lambda out, b: out.pow(2).mean(), progress=False)
    _train(gm)
    gm.save_pretrained(tmp_path / "ad")
    back = lrc.adapter_sets.from_pretrained(make_mlp(), tmp_path / "ad", example_inputs=(inputs(),)).eval()
    for n, p in gm.named_parameters():
        torch.testing.assert_close(dict(back.named_parameters())[n], p, rtol=0, atol=0, msg=n)


def test_named_sets_in_subdirectories_and_load_adapter_reads_peft_dirs(tmp_path):
    gm = lrc.transform(make_mlp(), "fc*:lora(r=4, alpha=8)", example_inputs=(inputs(),))
    lrc.adapter_sets.add_adapter(gm, "b", "fc*:lora(r=2, alpha=4)")
    with torch.no_grad():
        for name in ("b", "default"):
            lrc.adapter_sets.set_adapter(gm, name)
            for mod in lrc.adapters(gm).values():
                mod.lora_B.normal_(0, 0.3)
    x = inputs(seed=3)
    gm.save_pretrained(tmp_path / "ad")
    assert (tmp_path / "ad" / "b" / "adapter_config.json").is_file()
    back = lrc.adapter_sets.from_pretrained(make_mlp(), tmp_path / "ad", example_inputs=(inputs(),))
    assert lrc.adapter_sets.adapter_names(back) == ["default", "b"]
    other = lrc.transform(make_mlp(), "fc*:lora(r=4, alpha=8)", example_inputs=(inputs(),))
    lrc.adapter_sets.load_adapter(other, tmp_path / "ad" / "b", "b")  # a PEFT directory (was: "no such file")
    with torch.no_grad():
        for name in ("default", "b"):
            for g in (gm, back, other):
                lrc.adapter_sets.set_adapter(g, name) if name in lrc.adapter_sets.adapter_names(g) else None
            torch.testing.assert_close(back(x), gm(x), rtol=0, atol=0)
            if name == "b":
                torch.testing.assert_close(other(x), gm(x), rtol=0, atol=0)


def test_directory_errors(tmp_path):
    gm = lrc.transform(make_mlp(), "fc*:lora(r=4)", example_inputs=(inputs(),))
    with pytest.raises(lrc.errors.LoadError, match="no such directory"):
        lrc.adapter_sets.from_pretrained(make_mlp(), tmp_path / "nope", example_inputs=(inputs(),))
    (tmp_path / "empty").mkdir()
    with pytest.raises(lrc.errors.LoadError, match="not an adapter directory"):
        lrc.adapter_sets.from_pretrained(make_mlp(), tmp_path / "empty", example_inputs=(inputs(),))
    with pytest.raises(lrc.errors.LoadError, match="no such file or directory"):
        lrc.adapter_sets.load_adapter(gm, tmp_path / "nope", "b")
    gm.save_pretrained(tmp_path / "ad")
    with pytest.raises(lrc.errors.LoadError, match="already has adapters"):
        lrc.adapter_sets.from_pretrained(gm, tmp_path / "ad")


@pytest.mark.slow
def test_trainer_checkpoints_are_adapters_only_and_resume(tmp_path):
    """GPT-2 (tied head) under transformers.Trainer, checkpoint at step 2 of 4: the checkpoint's weights are a
    small fraction of the base weights, and resuming from it ends where the uninterrupted run ended."""
    import transformers as tf
    from safetensors.torch import load_file

    full = th.train("gpt2", tmp_path, 0, 1, checkpoint_every=2)
    ckpt = tmp_path / "gpt2_rank0" / "checkpoint-2"
    saved = load_file(ckpt / "model.safetensors")
    gm = lrc.transform(*th.model_and_spec("gpt2"), progress=False)
    trained = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trained <= set(saved) and not any(".adapter." not in k for k in saved), sorted(saved)[:5]
    base_bytes = sum(t.numel() * t.element_size() for t in th.model_and_spec("gpt2")[0].state_dict().values())
    assert (ckpt / "model.safetensors").stat().st_size < base_bytes / 10
    gm.load_state_dict(saved)  # strict: an adapters-only dict is complete
    args = th.training_args("gpt2", tmp_path / "resumed", 1)
    tr = tf.Trainer(model=gm, args=args, train_dataset=th.Rows("gpt2"))
    tr.train(resume_from_checkpoint=str(ckpt))
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]  # steps 1-2 come from the checkpoint's state
    assert losses == pytest.approx(full["losses"], rel=1e-5, abs=1e-6)
    for n, p in gm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, full["trained"][n], rtol=1e-5, atol=1e-7)
    gm.trainer_checkpoint = "full"  # opt out: the whole state dict, as before
    tr.save_model(str(tmp_path / "full"))
    assert set(load_file(tmp_path / "full" / "model.safetensors")) == set(gm.state_dict())
