"""LoRA-GA with svd="sketch": the streaming two-sided sketch against the exact gradient (and real MiniLM)."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from helpers.loraga import batches, captured_energy, projector_cols, projector_rows, target_loss, traced

import lowrank_compiler as lrc
from lowrank_compiler.frontend.trace import trace
from lowrank_compiler.methods.gradstats import ExactGradient, GradientSketch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))


def test_sketch_streams_the_same_matrix_as_exact():
    """Y = GΩ and Z = ΨG accumulated from (X, Δ) batches equal the sketches of the exact G."""
    g = torch.Generator().manual_seed(0)
    d_out, d_in, T = 40, 24, 16
    ex, sk = ExactGradient(d_out, d_in), GradientSketch(d_out, d_in, k=10, l_cols=20, seed=3)
    for _ in range(5):
        x, dy = torch.randn(2, T, d_in, generator=g), torch.randn(2, T, d_out, generator=g)
        ex.update(x, dy)
        sk.update(x, dy)
    for s in (ex, sk):
        s.finish(5)
    omega, psi = sk.test_matrices()
    torch.testing.assert_close(sk.Y, ex.G @ omega, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sk.Z, psi @ ex.G, atol=1e-4, rtol=1e-4)
    assert sk.nbytes() == 4 * (d_out * 10 + 20 * d_in) < ex.nbytes()


def test_sketch_recovers_a_low_rank_plus_noise_gradient():
    g = torch.Generator().manual_seed(1)
    d_out, d_in, rank = 96, 64, 8
    U = torch.linalg.qr(torch.randn(d_out, rank, generator=g))[0]
    V = torch.linalg.qr(torch.randn(d_in, rank, generator=g))[0]
    G = U @ torch.diag(torch.logspace(1, 0, rank)) @ V.t() + 1e-3 * torch.randn(d_out, d_in, generator=g)
    sk = GradientSketch(d_out, d_in, k=rank + 8, l_cols=2 * (rank + 8), seed=0)
    eye = torch.eye(d_in)
    for i, chunk in enumerate(G.t().split(16)):  # G = Σ Δᵀ X: X = rows i..i+16 of I, Δ = those rows of Gᵀ
        sk.update(eye[i * 16: i * 16 + chunk.shape[0]], chunk)
    sk.finish(1)
    Uk, S, Vk = sk.top(rank)
    torch.testing.assert_close(S, torch.linalg.svdvals(G)[:rank], atol=0.05, rtol=0.01)
    Ue, _, Vhe = torch.linalg.svd(G, full_matrices=False)
    assert (projector_cols(Uk) - projector_cols(Ue[:, :rank])).norm() < 0.1
    assert (projector_cols(Vk) - projector_cols(Vhe[:rank].t())).norm() < 0.1


def test_sketch_init_keeps_output_and_offset():
    model, base = traced("bert", dropout=False)
    ids = batches(1, seed=9)[0][0]
    gm = lrc.transform(base, "attention.self.*:loraga(r=4, svd='sketch')", data=batches(3),
                       loss_fn=target_loss(32), progress=False)
    torch.testing.assert_close(gm(ids).last_hidden_state, model(ids).last_hidden_state, atol=1e-5, rtol=0)
    for site, a in lrc.adapters(gm).items():
        W0 = model.get_parameter(f"{site}.weight")
        torch.testing.assert_close(gm.get_parameter(f"{site}.weight"), W0 - a.scaling * a.init_B @ a.init_A,
                                   atol=1e-6, rtol=0)


@pytest.mark.slow
def test_sketch_on_real_minilm_captures_the_exact_energy():
    from _minilm_task import distill_loss, load_minilm, make_batches, make_teacher, no_dropout

    torch.manual_seed(0)
    m = no_dropout(load_minilm())
    data, loss_fn = make_batches(4, batch=4, seq=64), distill_loss(make_teacher(m))
    sites = ["encoder.layer.2.attention.self.query", "encoder.layer.3.intermediate.dense",
             "encoder.layer.4.output.dense"]
    from helpers.loraga import reference_grads

    G = reference_grads(m, sites, data, loss_fn)
    base = trace(m, (data[0]["input_ids"],), {"attention_mask": data[0]["attention_mask"]})
    spec = "; ".join(f"{s}:loraga(r=8, svd={{svd!r}})" for s in sites)
    gms = {svd: lrc.transform(copy.deepcopy(base), spec.format(svd=svd), data=data, loss_fn=loss_fn,
                              progress=False) for svd in ("exact", "sketch")}
    ex, sk = lrc.adapters(gms["exact"]), lrc.adapters(gms["sketch"])
    with torch.no_grad():  # init output parity on the real model (fp32)
        ref = m(**data[0]).last_hidden_state
        for gm in gms.values():
            torch.testing.assert_close(gm(**data[0]).last_hidden_state, ref, atol=1e-5, rtol=0)
    for s in sites:
        U, S, Vh = torch.linalg.svd(G[s], full_matrices=False)
        e_ex = captured_energy(G[s], ex[s].lora_A.detach(), ex[s].lora_B.detach())
        e_sk = captured_energy(G[s], sk[s].lora_A.detach(), sk[s].lora_B.detach())
        assert e_ex / float(S[:16].pow(2).sum()) > 0.999  # exact = top-2r energy
        assert e_sk / e_ex >= 0.98, (s, e_sk / e_ex)
        # the well-separated top direction lands on the right side (ArB2r: v1 in A0, u1 not in B0)
        assert (projector_rows(sk[s].lora_A.detach()) @ Vh[0]).norm() > 0.99
        assert (projector_cols(sk[s].lora_B.detach()) @ U[:, 0]).norm() < 0.1
    # a few training steps: the sketch's loss stays within a few % of exact LoRA-GA's
    final = {}
    for svd, gm in gms.items():
        opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=2e-3)
        gm.train()
        for batch in data:
            opt.zero_grad()
            loss = loss_fn(gm(**batch), batch)
            loss.backward()
            opt.step()
        gm.eval()
        with torch.no_grad():
            final[svd] = sum(float(loss_fn(gm(**b), b)) for b in data)
    assert abs(final["sketch"] - final["exact"]) / final["exact"] < 0.05, final
