"""PEFT's LoRA initialisations (``LoraConfig.init_lora_weights``) as functions of the base weight.

Each function mirrors PEFT 0.21's ``LoraLayer.<name>_init`` step for step (same RNG draws in the
same order, same fp32 arithmetic), so on the same seed and data the factors equal PEFT's to float
rounding. They return ``(A, B)`` (r × d_in, d_out × r); the inits that move the base weight
(PiSSA, OLoRA, CorDA) leave ``W − s·B A`` to the caller (``methods/lora.py``), which keeps
(A0, B0) as the base offset so merge, export and the rank-2r portable form stay exact.
"""

from __future__ import annotations

import re

import torch

#: every accepted ``init=`` value; ``pissa_niter_<k>`` is matched by pattern
PLAIN_INITS = ("default", "gaussian", "orthogonal")
DATA_INITS = ("eva",)
OFFSET_INITS = ("pissa", "olora", "corda", "corda_kpm")
PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
VALID = (*PLAIN_INITS, *DATA_INITS, *OFFSET_INITS, "pissa_niter_<k>")


def check_init(value: str) -> str | None:
    """A spec-argument check: None when ``value`` names a known init."""
    if value in PLAIN_INITS or value in DATA_INITS or value in OFFSET_INITS or PISSA_NITER.fullmatch(value):
        return None
    return f"must be one of {', '.join(map(repr, VALID))}"


def moves_base(init: str) -> bool:
    """True for the inits that subtract their starting product from the base weight."""
    return init in OFFSET_INITS or bool(PISSA_NITER.fullmatch(init))


def gaussian(A: torch.Tensor, B: torch.Tensor, r: int) -> None:
    """PEFT ``init_lora_weights="gaussian"``: A ~ N(0, 1/r²) (std 1/r), B = 0, in place."""
    torch.nn.init.normal_(A, std=1 / r)
    torch.nn.init.zeros_(B)


def orthogonal(d_in: int, d_out: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT ``"orthogonal"`` (r even): one r × r orthogonal Q split into odd/even rows; A = G_a Q_odd / 10,
    B = G_b Q_even / 10 with Gaussian G. B A = 0 (the rows are orthogonal), so the output starts at the base."""
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    A = torch.randn(d_in, r // 2).mm(Q[0::2, :]).T / 10.0
    B = torch.randn(r // 2, d_out).T.mm(Q[1::2, :]) / 10.0
    return A.contiguous(), B.contiguous()


def pissa(W: torch.Tensor, r: int, scale: float, niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA (Meng et al. 2024, arXiv:2404.02948): the top-r singular triplets of W,
    A = √(S/s) Uᵀ, B = V √(S/s) (exact SVD, or ``torch.svd_lowrank(W, r, niter)`` for ``pissa_niter_k``)."""
    W = W.float()
    if niter is None:
        V, S, Uh = torch.linalg.svd(W, full_matrices=False)
        Vr, Sr, Uhr = V[:, :r], S[:r] / scale, Uh[:r]
    else:
        Vr, Sr, Ur = torch.svd_lowrank(W, r, niter=niter)
        Sr, Uhr = Sr / scale, Ur.t()
    return torch.diag(torch.sqrt(Sr)) @ Uhr, Vr @ torch.diag(torch.sqrt(Sr))


def olora(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA (Büyükakyüz 2024, arXiv:2406.01775): W = Q R, A = R[:r], B = Q[:, :r] (no 1/s, as PEFT)."""
    Q, R = torch.linalg.qr(W.float())
    return R[:r].contiguous(), Q[:, :r].contiguous()


def corda(W: torch.Tensor, cov: torch.Tensor, r: int, scale: float, kpm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """CorDA (Yang et al. 2024, arXiv:2406.05223), PEFT's ``collect_eigens_for_layer`` + ``corda_init``:
    C' = C + damp·mean(diag C)·I (damp doubled from 0.01 until ‖C' C'⁻¹ − I‖ < 0.05), W C' = U S Vhᵀ,
    V = (Vh C'⁻¹)ᵀ; ``ipm`` keeps the top r triplets, ``kpm`` the last r; A = √(S/s) Vᵀ, B = U √(S/s)."""
    W, cov = W.float(), cov.float()
    n = cov.shape[0]
    eye = torch.eye(n, device=cov.device)
    damp = 0.01
    while True:
        fixed = cov + torch.diag(torch.ones(n, device=cov.device) * torch.mean(torch.diag(cov)) * damp)
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(W @ fixed, full_matrices=False)
    V = (Vh @ inv).transpose(0, 1)
    keep = slice(-r, None) if kpm else slice(None, r)
    S, U, V = S[keep] / scale, U[:, keep], V[:, keep]
    return V.t().mul(S.sqrt().view(-1, 1)).contiguous(), U.mul(S.sqrt()).contiguous()
