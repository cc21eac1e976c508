"""lrc.optimizer: a real torch Optimizer (schedulers, clipping, GradScaler, state_dict resume, HF Trainer)."""

from __future__ import annotations

import pytest
import torch
from helpers.common import LabeledIds, tiny_bert_classifier, trainer_args
from helpers.mlp import inputs, make_mlp

import lowrank_compiler as lrc

MIXED = ("fc1:delta_lora(r=4, alpha=8, start=1); fc2:lora_pro(r=4, alpha=8); "
         "fc3:lorasc(r=2, alpha=4, cascade_every=3)")


def batch(i: int):
    g = torch.Generator().manual_seed(200 + i)
    return torch.randn(6, 12, generator=g), torch.randn(6, 10, generator=g)


def steps(gm, opt, sched, start, stop, scaler=None):
    for i in range(start, stop):
        x, t = batch(i)
        loss = (gm(x) - t).pow(2).mean()
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gm.parameters(), 0.5)
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(gm.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
        sched.step()
        opt.zero_grad()


def make(spec=MIXED, lr=1e-2):
    gm = lrc.transform(make_mlp(), spec, example_inputs=(inputs(),))
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return gm, opt, sched


def params(gm):
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}


def test_is_a_real_optimizer_and_groups_follow_the_scheduler():
    gm = lrc.transform(make_mlp(), "fc1:lora_plus(r=4, ratio=8); fc*:dora(r=4, dropout=0.0)",
                       example_inputs=(inputs(),))
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW) and isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    owned = {id(p) for p in gm.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == owned
    steps(gm, opt, sched, 0, 2)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([2.5e-4, 2e-3])  # two steps of gamma 0.5; lr_B / lr_A = 8 kept
    assert opt.state_dict()["lrc"] == {"step": 2}


def test_resume_gives_the_same_next_steps_as_never_stopping(tmp_path):
    gm_a, opt_a, sched_a = make()
    steps(gm_a, opt_a, sched_a, 0, 5)

    gm_b, opt_b, sched_b = make()
    steps(gm_b, opt_b, sched_b, 0, 2)
    lrc.save(gm_b, tmp_path / "ckpt.lrc")
    torch.save({"opt": opt_b.state_dict(), "sched": sched_b.state_dict()}, tmp_path / "opt.pt")
    del gm_b, opt_b, sched_b

    gm_c = lrc.load(tmp_path / "ckpt.lrc")
    opt_c = lrc.optimizer(gm_c, torch.optim.AdamW, lr=1e-2, weight_decay=0.01)
    sched_c = torch.optim.lr_scheduler.LambdaLR(opt_c, lambda s: 1.0 / (1 + s))
    st = torch.load(tmp_path / "opt.pt", weights_only=True)
    opt_c.load_state_dict(st["opt"])
    sched_c.load_state_dict(st["sched"])
    assert opt_c.lrc_step == 2
    steps(gm_c, opt_c, sched_c, 2, 5)  # crosses the lorasc cascade at step 3 and moves W (delta_lora)
    a, c = params(gm_a), params(gm_c)
    assert set(a) == set(c)
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert int(lrc.adapters(gm_c)["fc3"].cascades) == 1


def test_grad_scaler_gives_the_same_steps():
    gm_a, opt_a, sched_a = make()
    steps(gm_a, opt_a, sched_a, 0, 4)
    gm_b, opt_b, sched_b = make()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    steps(gm_b, opt_b, sched_b, 0, 4, scaler=scaler)
    a, b = params(gm_a), params(gm_b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


def test_step_on_merged_adapters_is_refused():
    gm, opt, _ = make("fc*:lora_fa(r=4)")
    lrc.merge(gm, keep_adapters=True)
    with pytest.raises(lrc.LrcError, match=r"lrc\.unmerge\(gm\)"):
        opt.step()


def test_closure_and_plain_trainables():
    gm = lrc.transform(make_mlp(), "fc1:lora_plus(r=4)", example_inputs=(inputs(),))
    gm.get_parameter("fc3.bias").requires_grad_(True)  # an unfrozen head parameter gets its own group
    opt = lrc.optimizer(gm, torch.optim.SGD, lr=0.1)
    bias0 = gm.get_parameter("fc3.bias").detach().clone()
    x, t = batch(0)

    def closure():
        opt.zero_grad()
        loss = (gm(x) - t).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss) and not torch.equal(gm.get_parameter("fc3.bias"), bias0)


@pytest.mark.slow
def test_hf_trainer_runs_the_update_rules(tmp_path):
    tf = pytest.importorskip("transformers")
    model, ids, example = tiny_bert_classifier()
    spec = "attention.self.query:delta_lora(r=4, start=1); attention.self.value:lora_plus(r=4, ratio=4)"
    gm = lrc.transform(model, spec, example_inputs=(ids,), example_kwargs=example)
    w0 = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    args = trainer_args(tmp_path, 3)
    opt, sched = lrc.training.trainer_optimizers(gm, torch.optim.AdamW, lr=1e-2)
    trainer = tf.Trainer(model=gm, args=args, train_dataset=LabeledIds(8), optimizers=(opt, sched))
    trainer.train()
    assert opt.lrc_step == 3
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs[-1] == pytest.approx(4 * lrs[0]) and lrs[-1] < 4e-2  # linear decay kept the LoRA+ ratio
    w = gm.get_parameter("bert.encoder.layer.0.attention.self.query.weight")
    assert not torch.equal(w, w0)  # Delta-LoRA moved W on steps 2 and 3
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, w0)
