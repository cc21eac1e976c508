"""Trainable heads: ``PATTERN:full`` (PEFT's modules_to_save) trains a whole module instead of adapting it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank_compiler as lrc
from lowrank_compiler import ir
from lowrank_compiler.api import trainable_parameters
from lowrank_compiler.errors import LoadError, SpecError

SPEC = "attention.self.query:lora(r=4, alpha=8); attention.self.value:lora(r=4, alpha=8); classifier:full"


def bert_cls(labels: int = 3) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=64, num_labels=labels)
    return tf.BertForSequenceClassification(cfg).eval()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask


def transformed(spec: str = SPEC, model: nn.Module | None = None):
    model = model if model is not None else bert_cls()
    ids, mask = batch()
    return model, lrc.transform(model, spec, (ids,), {"attention_mask": mask})


def perturb(gm) -> None:
    """Non-zero adapters and a changed head, so every comparison below proves something."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.1)
        for p in gm.get_submodule("classifier").parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def logits(gm) -> torch.Tensor:
    ids, mask = batch()
    with torch.no_grad():
        return gm(ids, mask).logits


class Tiny(nn.Module):
    """fx-traceable: the user's modules are shared with the GraphModule (call_module)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(x)))


def test_full_parses_and_takes_no_arguments():
    spec = lrc.Spec.parse("classifier:full; *:lora(r=2)")
    assert spec.rules[0].full and not spec.rules[0].adapts and spec.rules[1].adapts
    assert str(spec.rules[0]) == "classifier:full"
    with pytest.raises(SpecError, match="'full' takes no arguments"):
        lrc.Spec.parse("classifier:full(r=2)")
    with pytest.raises(SpecError, match="full"):
        lrc.Spec.parse("classifier:fulll")  # did-you-mean lists it


def test_head_trainable_counts_and_user_model_untouched():
    model, gm = transformed()
    original = copy.deepcopy(model.state_dict())
    head = sum(p.numel() for p in model.classifier.parameters())
    lora = 2 * 2 * 4 * (32 + 32)  # 2 layers x (query, value) x r=4 x (d_in + d_out)
    assert trainable_parameters(gm)[0] == lora + head
    assert ir.lrc_meta(gm)["full_modules"] == ["classifier"]
    ir.verify(gm)
    ids, mask = batch()
    assert (logits(gm) - model(ids, attention_mask=mask).logits).abs().max() == 0
    opt = lrc.optimizer(gm, torch.optim.SGD, lr=0.5)
    loss = gm(ids, mask).logits.logsumexp(-1).mean()
    loss.backward()
    assert gm.classifier.weight.grad is not None and gm.classifier.weight.grad.abs().sum() > 0
    before = gm.classifier.weight.detach().clone()
    opt.step()
    assert (gm.classifier.weight - before).abs().max() > 0
    for k, v in model.state_dict().items():  # training the head never writes the user's tensors
        assert torch.equal(v, original[k]), k


def test_fx_traced_shared_module_is_copied_not_mutated():
    model = Tiny()
    x = torch.randn(3, 6)
    gm = lrc.transform(model, "body:lora(r=2); head:full; norm:full", (x,))
    assert ir.lrc_meta(gm)["trace"] == "fx"
    assert gm.head is not model.head and gm.norm is not model.norm
    assert torch.allclose(gm(x), model(x))
    gm(x).sum().backward()
    assert gm.head.weight.grad is not None and gm.norm.weight.grad is not None
    assert model.head.weight.grad is None and model.norm.weight.grad is None
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == {
        "body.adapter.lora_A", "body.adapter.lora_B", "head.weight", "head.bias", "norm.weight", "norm.bias"}


@pytest.mark.parametrize("spec, trained", [
    ("*attention.output.LayerNorm:full; attention.self.query:lora(r=2)",
     {"bert.encoder.layer.0.attention.output.LayerNorm", "bert.encoder.layer.1.attention.output.LayerNorm"}),
    ("word_embeddings:full", {"bert.embeddings.word_embeddings"}),
    ("*:lora(r=2); *LayerNorm:full", None),  # adapting rules don't shadow `full` for non-linear modules
])
def test_non_linear_modules(spec, trained):
    model, gm = transformed(spec)
    full = set(ir.lrc_meta(gm)["full_modules"])
    if trained is None:
        trained = {n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert full == trained
    ir.verify(gm)
    ids, mask = batch()
    gm(ids, mask).logits.sum().backward()
    for path in trained:
        for p in gm.get_submodule(path).parameters():
            assert p.requires_grad and p.grad is not None
    want = {f"{m}.{n}" for m in trained for n, _ in gm.get_submodule(m).named_parameters()}
    have = {n for n, p in gm.named_parameters() if p.requires_grad and ".adapter." not in n}
    assert have == want


def test_first_rule_wins_and_conflicts_are_spec_errors():
    _, gm = transformed("classifier:full; *:lora(r=2)")
    assert ir.lrc_meta(gm)["full_modules"] == ["classifier"]
    assert "classifier" not in lrc.adapters(gm)
    with pytest.raises(SpecError, match="contains the adapted site"):
        transformed("bert.encoder.layer.0:full; query:lora(r=2)")
    with pytest.raises(SpecError, match="matched no module; nearby module names: .*classifier"):
        transformed("classifer:full; query:lora(r=2)")


def test_save_load_keeps_head_trainable(tmp_path):
    _, gm = transformed()
    perturb(gm)
    want = logits(gm)
    path = tmp_path / "m.lrc"
    lrc.save(gm, path)
    back = lrc.load(path)
    assert torch.allclose(logits(back), want, atol=1e-6)
    assert ir.lrc_meta(back)["full_modules"] == ["classifier"]
    assert all(p.requires_grad for p in back.classifier.parameters())
    assert trainable_parameters(back)[0] == trainable_parameters(gm)[0]
    ir.verify(back)


def test_save_adapters_carries_the_head(tmp_path):
    _, gm = transformed()
    perturb(gm)
    want = logits(gm)
    lrc.save_adapters(gm, tmp_path / "a.safetensors")
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "a.safetensors"))
    assert {"classifier.weight", "classifier.bias"} <= keys
    _, fresh = transformed()
    assert not torch.allclose(logits(fresh), want)
    lrc.load_adapters(fresh, tmp_path / "a.safetensors")
    assert torch.allclose(logits(fresh), want, atol=1e-6)
    _, other = transformed(SPEC.replace("; classifier:full", ""))
    with pytest.raises(LoadError, match="fully trained modules"):
        lrc.load_adapters(other, tmp_path / "a.safetensors")


def test_merge_keeps_the_trained_head():
    _, gm = transformed()
    perturb(gm)
    merged = lrc.merge(gm)
    assert not lrc.adapters(merged)
    assert torch.allclose(logits(merged), logits(gm), atol=1e-5)
    assert torch.equal(merged.classifier.weight, gm.classifier.weight)


def test_peft_export_as_modules_to_save(tmp_path):
    peft = pytest.importorskip("peft")
    _, gm = transformed()
    perturb(gm)
    lrc.export(gm, tmp_path / "p", format="peft")
    ref = peft.PeftModel.from_pretrained(bert_cls(), tmp_path / "p").eval()
    ids, mask = batch()
    with torch.no_grad():
        got = ref(input_ids=ids, attention_mask=mask).logits
    assert (got - logits(gm)).abs().max() < 1e-5
    assert ref.peft_config["default"].modules_to_save == ["classifier"]


def test_peft_import_of_modules_to_save(tmp_path):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(bert_cls(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                          modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    pm.save_pretrained(tmp_path / "p")
    ids, mask = batch()
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask).logits
    gm = lrc.load_peft(bert_cls(), tmp_path / "p", (ids,), {"attention_mask": mask})
    assert (logits(gm) - want).abs().max() < 1e-5
    assert ir.lrc_meta(gm)["full_modules"] == ["classifier"]
    assert all(p.requires_grad for p in gm.classifier.parameters())


@pytest.mark.parametrize("with_data", [False, True], ids=["example-inputs", "data-no-example-inputs"])
def test_head_trains_in_every_call_signature(with_data):
    """A call with ``labels`` (a new signature, traced on first use) gives the head the gradient the
    unmodified HF model's head gets (adapters at B=0 change nothing), and the count is what trains."""
    model = bert_cls()
    ids, mask = batch()
    labels = torch.tensor([0, 2])
    ref = copy.deepcopy(model)
    ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    if with_data:
        data = [{"input_ids": ids, "attention_mask": mask, "labels": labels}]
        gm = lrc.transform(model, SPEC.replace("lora(", "loraga("), data=data, loss_fn=lambda o, b: o.loss,
                           progress=False)
    else:
        gm = lrc.transform(model, SPEC)
    head = gm.get_submodule("classifier")
    trains = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    gm(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert head.weight.requires_grad and head.weight.grad is not None
    assert f"trainable params: {trains:,} " in gm.print_trainable_parameters()
    assert trains == sum(p.numel() for p in gm.parameters() if p.requires_grad)  # the new signature froze nothing
    if not with_data:  # LoRA-GA moves the base weights, so only LoRA's B=0 start equals the plain model
        torch.testing.assert_close(head.weight.grad, ref.classifier.weight.grad, atol=1e-6, rtol=1e-5)
