"""PEFT's LoRA initialisations (``lora(init=...)``) against PEFT itself, and the base offset they leave.

Reference: PEFT's ``LoraConfig(init_lora_weights=...)`` on the same model, seed and data; the random
inits are compared at one layer, after the same seed, with PEFT's own init method on a PEFT layer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.mlp import make_mlp

import lowrank_compiler as lrc
from lowrank_compiler.errors import InitError, SpecError
from lowrank_compiler.methods.base import SiteInfo
from lowrank_compiler.methods.lora import EvaLoRA, LoRA, OffsetLoRA

peft = pytest.importorskip("peft")
SITES = ("fc1", "fc2", "fc3")
SPEC = "fc*:lora(r=4, alpha=8, init='{init}')"


def x3(n: int = 1, seq: int = 5, seed: int = 1) -> torch.Tensor:
    """(n, seq, 12) inputs: PEFT's CorDA hook takes one sample per call (batch 1, 2-D after squeeze)."""
    return torch.randn(n, seq, 12, generator=torch.Generator().manual_seed(seed))


CALIB = [x3(seed=10 + i) for i in range(6)]


def peft_model(init: str):
    model = make_mlp()
    corda = init.startswith("corda")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(SITES), init_lora_weights="corda" if corda else init)
    if corda:
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda
        config.corda_config = CordaConfig(corda_method="kpm" if init == "corda_kpm" else "ipm")
        preprocess_corda(model, config, run_model=lambda: [model(x) for x in CALIB])
    return peft.get_peft_model(model, config)


def ours(init: str, **kw):
    return lrc.transform(make_mlp(), SPEC.format(init=init), example_inputs=(x3(),),
                         data=[(x,) for x in CALIB], progress=False, **kw)


def peft_layer(pm, site):
    return getattr(pm.base_model.model, site)


@pytest.mark.parametrize("init", ["pissa", "olora", "corda", "corda_kpm"])
def test_factors_and_offset_base_equal_peft(init):
    pm, gm = peft_model(init), ours(init)
    for site in SITES:
        lay, ad = peft_layer(pm, site), lrc.adapters(gm)[site]
        assert isinstance(ad, OffsetLoRA) and ad.name == "lora"
        torch.testing.assert_close(ad.lora_A, lay.lora_A.default.weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(ad.lora_B, lay.lora_B.default.weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(gm.get_parameter(f"{site}.weight"), lay.base_layer.weight, atol=1e-5, rtol=0)
    x = x3(2, seed=7)
    torch.testing.assert_close(gm(x), pm(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(gm(x), make_mlp()(x), atol=1e-5, rtol=0)  # the init keeps the base's output


def _site(d_in=12, d_out=24):
    return SiteInfo("fc1", d_in, d_out)


@pytest.mark.parametrize("init", ["gaussian", "orthogonal"])
def test_random_inits_equal_peft_on_the_same_seed(init):
    lay = peft_layer(peft_model("gaussian"), "fc1")
    torch.manual_seed(123)
    if init == "gaussian":
        lay.reset_lora_parameters("default", "gaussian")
    else:
        lay.orthogonal_init("default")
    torch.manual_seed(123)
    ad = LoRA(_site(), r=4, alpha=8.0, init=init)
    assert type(ad) is LoRA
    torch.testing.assert_close(ad.lora_A, lay.lora_A.default.weight, atol=1e-7, rtol=0)
    torch.testing.assert_close(ad.lora_B, lay.lora_B.default.weight, atol=1e-7, rtol=0)


def test_pissa_niter_equals_peft_on_the_same_seed():
    lay = peft_layer(peft_model("gaussian"), "fc1")
    w0 = lay.base_layer.weight.detach().clone()
    torch.manual_seed(9)
    lay.pissa_init("default", "pissa_niter_3")
    ad = OffsetLoRA(_site(), **LoRA.resolve_args({"r": 4, "init": "pissa_niter_3"}))
    torch.manual_seed(9)
    w_res = ad.initialize(None, w0)
    torch.testing.assert_close(ad.lora_A, lay.lora_A.default.weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(ad.lora_B, lay.lora_B.default.weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(w_res, lay.base_layer.weight, atol=1e-5, rtol=0)


def _train(gm, steps=3):
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=1e-2)
    for i in range(steps):
        x = x3(2, seed=50 + i)
        gm(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return gm


@pytest.mark.parametrize("init", ["pissa", "corda"])
def test_offset_survives_merge_save_load_and_peft_export(init, tmp_path):
    gm = _train(ours(init)).eval()
    x = x3(3, seed=8)
    want = gm(x)
    assert not torch.allclose(want, make_mlp()(x), atol=1e-4)  # training moved it
    torch.testing.assert_close(lrc.merge(gm)(x), want, atol=1e-5, rtol=0)
    lrc.save(gm, tmp_path / "m.lrc")
    back = lrc.load(tmp_path / "m.lrc")
    torch.testing.assert_close(back(x), want, atol=1e-6, rtol=0)
    assert bool(lrc.adapters(back)["fc1"].initialized)
    # rank-2r portable form: PEFT loads it on the UNMODIFIED base and gives the trained outputs
    lrc.export(gm, tmp_path / "peft", format="peft")
    pm = peft.PeftModel.from_pretrained(make_mlp(), tmp_path / "peft").eval()
    assert peft_layer(pm, "fc1").lora_A.default.weight.shape[0] == 8
    torch.testing.assert_close(pm(x), want, atol=1e-5, rtol=0)


def test_pissa_needs_no_data_and_corda_needs_no_loss():
    gm = lrc.transform(make_mlp(), SPEC.format(init="pissa"), example_inputs=(x3(),))
    assert bool(lrc.adapters(gm)["fc2"].initialized)
    ours("corda")  # data, no loss_fn
    with pytest.raises(InitError, match="pass data"):
        lrc.transform(make_mlp(), SPEC.format(init="corda"), example_inputs=(x3(),))


def test_bad_init_values_are_spec_errors():
    with pytest.raises(SpecError, match="pissa_niter_<k>"):
        lrc.transform(make_mlp(), "fc1:lora(init='pisa')", example_inputs=(x3(),))
    with pytest.raises(SpecError, match="even r"):
        lrc.transform(make_mlp(), "fc1:lora(r=3, init='orthogonal')", example_inputs=(x3(),))


def test_deepcopy_keeps_the_offset_class():
    gm = ours("olora")
    cp = copy.deepcopy(gm)
    assert type(lrc.adapters(cp)["fc1"]) is OffsetLoRA
    x = x3(2)
    torch.testing.assert_close(cp(x), gm(x))


def test_eva_equals_peft_get_eva_state_dict():
    """PEFT streams (cycling the data) until every component is stable; lrc's init pass does the same."""
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    g = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 16, 12, generator=g) * torch.logspace(1, -1, 12) for _ in range(30)]  # distinct variances
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(SITES), init_lora_weights="eva",
                          eva_config=EvaConfig(rho=1.0))
    ref = get_eva_state_dict(make_mlp(), data, cfg, forward_fn=lambda m, x: m(x), prepare_model_inputs_fn=None,
                             prepare_layer_inputs_fn=None, show_progress_bar=False)
    gm = lrc.transform(make_mlp(), SPEC.format(init="eva"), example_inputs=(data[0],),
                       data=[(x,) for x in data], progress=False)
    for site in SITES:
        ad = lrc.adapters(gm)[site]
        assert isinstance(ad, EvaLoRA) and not ad.modifies_base and bool(ad.initialized)
        torch.testing.assert_close(ad.lora_A, ref[site].float(), atol=1e-5, rtol=0)
        assert not ad.lora_B.any()
    x = data[0]
    torch.testing.assert_close(gm(x), make_mlp()(x), atol=0, rtol=0)


def test_eva_stops_at_init_batches_and_mask_selects_token_rows():
    from lowrank_compiler.methods.gradstats import InputPCA

    s = InputPCA(2)
    x = torch.randn(2, 3, 5)
    s.row_mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    s.update(x)
    cov = x[s.row_mask]
    ref = torch.linalg.svd(cov - cov.mean(0), full_matrices=False).Vh[:2]
    torch.testing.assert_close(s.top().abs(), ref.abs(), atol=1e-5, rtol=0)  # exact rank: lowrank = full SVD
    data = [(torch.randn(4, 16, 12),) for _ in range(3)]
    gm = lrc.transform(make_mlp(), SPEC.format(init="eva"), example_inputs=(data[0][0],), data=data,
                       init_batches=2, progress=False)
    assert bool(lrc.adapters(gm)["fc1"].initialized)


def token_batches(n: int, batch: int, seq: int = 32) -> list[dict[str, torch.Tensor]]:
    """Random word-piece ids of random lengths (padded), as input_ids/attention_mask dicts."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        mask = (torch.arange(seq)[None, :] < torch.randint(seq // 2, seq + 1, (batch, 1), generator=g)).long()
        ids = torch.randint(1000, 29000, (batch, seq), generator=g) * mask
        ids[:, 0] = 101
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("init", ["pissa", "olora", "corda", "eva"])
def test_inits_equal_peft_on_real_minilm(init, minilm_dir):
    """The real all-MiniLM-L6-v2, query/value of layers 0 and 5: PEFT's factors, offset bases and outputs."""
    from peft.tuners.lora.config import CordaConfig, EvaConfig
    from transformers import BertModel

    def load_minilm():
        return BertModel.from_pretrained(minilm_dir, local_files_only=True).eval()

    data = token_batches(6, batch=1 if init == "corda" else 4)  # PEFT's CorDA hook takes batch 1
    ref_model = load_minilm()
    sites = [f"encoder.layer.{i}.attention.self.{p}" for i in (0, 5) for p in ("query", "value")]
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=sites, init_lora_weights=init)
    if init == "corda":
        from peft.tuners.lora.corda import preprocess_corda
        config.corda_config = CordaConfig(corda_method="ipm")
        preprocess_corda(ref_model, config, run_model=lambda: [ref_model(**b) for b in data])
    pm = peft.get_peft_model(ref_model, config)
    if init == "eva":
        from peft.tuners.lora.eva import initialize_lora_eva_weights
        config.eva_config = EvaConfig(rho=1.0)
        initialize_lora_eva_weights(pm, data, show_progress_bar=False)
    b0 = data[0]
    pm.eval()
    gm = lrc.transform(load_minilm(), "; ".join(f"{s}:lora(r=8, alpha=16, init='{init}')" for s in sites),
                       example_inputs=(b0["input_ids"],),
                       example_kwargs={"attention_mask": b0["attention_mask"]}, data=data, progress=False)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert len(lrc.adapters(gm)) == len(sites)
    for site, ad in lrc.adapters(gm).items():
        lay = peft_layers[site]
        torch.testing.assert_close(ad.lora_A, lay.lora_A.default.weight.float(), atol=1e-5, rtol=0)
        torch.testing.assert_close(ad.lora_B, lay.lora_B.default.weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(gm.get_parameter(f"{site}.weight"), lay.base_layer.weight, atol=1e-5, rtol=0)
    with torch.no_grad():
        want = load_minilm()(**b0).last_hidden_state
        torch.testing.assert_close(gm(**b0).last_hidden_state, pm(**b0).last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(gm(**b0).last_hidden_state, want, atol=1e-4, rtol=0)


def _nf4_levels() -> torch.Tensor:
    """QLoRA's NF4 levels from their definition (bitsandbytes ``create_normal_map(0.9677083)``)."""
    icdf = torch.distributions.Normal(0.0, 1.0).icdf
    pos = icdf(torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -icdf(torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.abs().max()).float()


def test_nf4_quantizer_matches_its_definition():
    from lowrank_compiler.methods.lora_inits import NF4_CODE, fake_quantize

    levels = _nf4_levels()
    torch.testing.assert_close(torch.tensor(NF4_CODE), levels, atol=1e-6, rtol=0)
    W = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    q = fake_quantize(W, 4)
    blocks, qb = W.reshape(-1, 64), q.reshape(-1, 64)  # 960 = 15 blocks of 64
    for b, got in zip(blocks, qb):
        absmax = b.abs().max()
        want = levels[(b / absmax).unsqueeze(1).sub(levels).abs().argmin(1)] * absmax
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    q8 = fake_quantize(W, 8)
    step = W.abs().amax(1, keepdim=True) / 127
    torch.testing.assert_close(q8, torch.round(W / step) * step, atol=1e-6, rtol=0)


def test_loftq_alternates_and_reduces_the_quantization_error():
    from lowrank_compiler.methods.lora_inits import fake_quantize

    spec = "fc*:lora(r=4, alpha=4, init='loftq', loftq_iter={it})"  # s = 1, as PEFT's LoftQ assumes
    errs = []
    for it in (1, 3):
        gm = lrc.transform(make_mlp(), spec.format(it=it), example_inputs=(x3(),))
        ad, W = lrc.adapters(gm)["fc1"], make_mlp().fc1.weight.detach()
        Q = gm.get_parameter("fc1.weight")
        res = W.clone()  # the paper's Algorithm 1, written out here
        for _ in range(it):
            deq = fake_quantize(res, 4)
            U, S, Vh = torch.linalg.svd(W - deq, full_matrices=False)
            L, R = U[:, :4] * S[:4].sqrt(), S[:4].sqrt()[:, None] * Vh[:4]
            res = W - L @ R
        torch.testing.assert_close(Q, deq, atol=1e-6, rtol=0)
        torch.testing.assert_close(ad.lora_B @ ad.lora_A, L @ R, atol=1e-5, rtol=0)
        errs.append(float((W - Q - ad.lora_B @ ad.lora_A).norm()))
        assert errs[-1] < float((W - fake_quantize(W, 4)).norm())
        assert ad.base_offset() is None and ad.original_base_factors() is None
    assert errs[1] <= errs[0] * 1.001


@pytest.mark.slow
def test_eva_and_corda_under_two_processes_equal_one(tmp_path):
    """torchrun, 2 gloo ranks, each its half of every batch: both ranks hold one process's init."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from helpers import dist_inits

    here = Path(__file__).resolve().parents[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(here / "helpers" / "dist_inits.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=here.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"inits_rank{r}.pt") for r in range(2)]
    for init in ("eva", "corda"):
        one = dist_inits.run(init)
        for key, want in one.items():
            torch.testing.assert_close(ranks[0][init][key], ranks[1][init][key], atol=0, rtol=0)
            torch.testing.assert_close(ranks[0][init][key], want, atol=1e-5, rtol=0)
