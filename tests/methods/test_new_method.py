"""A new method is one file: this test file defines one, and the whole pipeline takes it with no other edit
(spec, insert, train, merge, save/load, ONNX with separate adapters, PEFT export)."""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from helpers.common import TinyMLP
from torch import nn

import lowrank_compiler as lrc
from lowrank_compiler.backends.onnx.export import session
from lowrank_compiler.methods.args import Arg, positive
from lowrank_compiler.methods.base import LowRank, SiteInfo


@lrc.register_method
class GatedLR(lrc.AdapterMethod):
    """y = W x + b + g · U D x, with a trainable scalar gate g that starts at 0 (test-only method)."""

    name = "gated_lr"
    args = {"r": Arg(2, (int,), positive, "rank")}

    def __init__(self, site: SiteInfo, **kwargs: Any) -> None:
        super().__init__(site, **kwargs)
        r = int(self.config["r"])
        self.down = nn.Parameter(torch.randn(r, site.d_in) / site.d_in ** 0.5)
        self.up = nn.Parameter(torch.randn(site.d_out, r) / r ** 0.5)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = F.linear(x, weight, bias)
        return out if self.passthrough else out + self.gate * F.linear(F.linear(x, self.down), self.up)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.gate.detach() * (self.up.detach() @ self.down.detach())

    def low_rank_factors(self) -> LowRank | None:
        return LowRank(self.down.detach(), self.up.detach(), float(self.gate))


def _reference(model: nn.Module, gm: torch.fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    """The method's formula applied by hand to the unmodified model's layers."""
    ad = lrc.adapters(gm)

    def lin(name: str, h: torch.Tensor) -> torch.Tensor:
        m, a = getattr(model, name), ad[name]
        return m(h) + a.gate * (h @ a.down.T @ a.up.T)

    return lin("down", torch.relu(lin("up", h=x)))


def test_new_method_end_to_end(tmp_path):
    torch.manual_seed(0)
    model, x = TinyMLP().eval(), torch.randn(2, 5, 8)
    gm = lrc.transform(model, "up:gated_lr(r=2); down:gated_lr(r=3)", (x,)).eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)  # gate = 0: the base model exactly
    opt = lrc.optimizer(gm, torch.optim.SGD, lr=0.1)
    gm.train()
    for _ in range(3):
        gm(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    gm.eval()
    assert all(float(a.gate) != 0 for a in lrc.adapters(gm).values())
    with torch.no_grad():
        ref = _reference(model, gm, x)
        torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lrc.merge(gm)(x), ref, rtol=1e-5, atol=1e-5)
        lrc.save(gm, tmp_path / "m.lrc")
        torch.testing.assert_close(lrc.load(tmp_path / "m.lrc")(x), ref, rtol=1e-5, atol=1e-6)

    report = lrc.export(gm, tmp_path / "m.onnx", adapters_dir=tmp_path)  # separate adapters via low_rank_factors
    sess = session(tmp_path / "m.onnx", providers="cpu")
    got = sess({"x": x.numpy()}, adapter=report["adapters"][0])[0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sess({"x": x.numpy()})[0], model(x).detach().numpy(), rtol=1e-4, atol=1e-5)

    lrc.export(gm, tmp_path / "peft", format="peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["rank_pattern"]) == (2, {"down": 3})
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), ref, rtol=1e-5, atol=1e-5)
