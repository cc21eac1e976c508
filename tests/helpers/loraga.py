"""Shared helpers of the LoRA-GA tests: dropout-free models, batches, autograd reference gradients."""

from __future__ import annotations

import copy

import torch

import lowrank_compiler as lrc
from helpers.common import VOCAB, hidden
from lowrank_compiler.frontend.trace import trace


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout p = 0, so train-mode passes are deterministic and comparable with eager."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout_prob", "attn_dropout_p", "attention_probs_dropout_prob"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    cfg = getattr(model, "config", None)
    for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attn_pdrop", "resid_pdrop",
                 "embd_pdrop", "attention_dropout"):
        if cfg is not None and hasattr(cfg, attr):
            setattr(cfg, attr, 0.0)
    return model


def batches(n: int, batch: int = 2, seq: int = 8, vocab: int = VOCAB, seed: int = 0) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (batch, seq), generator=g),) for _ in range(n)]


def target_loss(d_model: int, seq: int = 8, seed: int = 1):
    """A regression loss of the last hidden state onto a fixed random target (a real gradient signal)."""
    tgt = torch.randn(seq, d_model, generator=torch.Generator().manual_seed(seed))

    def loss_fn(out, batch) -> torch.Tensor:
        h = hidden(out)
        return ((h - tgt[: h.shape[1]]) ** 2).mean()

    return loss_fn


def reference_grads(model: torch.nn.Module, sites: list[str], data, loss_fn,
                    conv1d: bool = False) -> dict[str, torch.Tensor]:
    """Mean over batches of ∂L/∂W (d_out × d_in, fp32) by plain autograd on the eager model."""
    params = {s: model.get_parameter(f"{s}.weight") for s in sites}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    model.train()
    for batch in data:
        out = model(**batch) if isinstance(batch, dict) else model(*batch)
        loss_fn(out, batch).backward()
    out = {}
    for s, p in params.items():
        g = p.grad.float() / len(data)
        out[s] = g.t().contiguous() if conv1d else g
        p.grad = None
    for n, p in model.named_parameters():
        p.requires_grad_(saved[n])
    model.eval()
    return out


def projector_rows(M: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the row space of M."""
    Q, _ = torch.linalg.qr(M.t().double())
    return (Q @ Q.t()).float()


def projector_cols(M: torch.Tensor) -> torch.Tensor:
    Q, _ = torch.linalg.qr(M.double())
    return (Q @ Q.t()).float()


def captured_energy(G: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor) -> float:
    """‖P_B G‖² + ‖G P_A‖² − ‖P_B G P_A‖²: energy of G in span(B0) ⊕ rowspan(A0), not double counted."""
    PA, PB = projector_rows(A0), projector_cols(B0)
    return float((PB @ G).pow(2).sum() + (G @ PA).pow(2).sum() - (PB @ G @ PA).pow(2).sum())


def loraga_adapters(gm) -> dict:
    return {k: v for k, v in lrc.adapters(gm).items() if v.name == "loraga"}


_TRACED: dict[tuple[str, bool], tuple[torch.nn.Module, torch.fx.GraphModule]] = {}


def traced(kind: str, dropout: bool = True) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    """(eager model, a fresh copy of its traced GraphModule); tracing runs once per kind per session."""
    from helpers.common import example_ids, make_hf

    key = (kind, dropout)
    if key not in _TRACED:
        model = make_hf(kind)
        if not dropout:
            no_dropout(model)
        _TRACED[key] = (model, trace(model, (example_ids(),)))
    model, gm = _TRACED[key]
    return model, copy.deepcopy(gm)
