"""PEFT's LoRA initialisations (``LoraConfig.init_lora_weights``) as functions of the base weight.

Each function mirrors PEFT 0.21's ``LoraLayer.<name>_init`` step for step (same RNG draws in the
same order, same fp32 arithmetic), so on the same seed and data the factors equal PEFT's to float
rounding. They return ``(A, B)`` (r × d_in, d_out × r); the inits that move the base weight
(PiSSA, OLoRA, CorDA; LoftQ replaces it by its quantized value) leave ``W − s·B A`` to the caller (``methods/lora.py``), which keeps
(A0, B0) as the base offset so merge, export and the rank-2r portable form stay exact.
"""

from __future__ import annotations

import re

import torch

#: every accepted ``init=`` value; ``pissa_niter_<k>`` is matched by pattern
PLAIN_INITS = ("default", "gaussian", "orthogonal")
DATA_INITS = ("eva",)
OFFSET_INITS = ("pissa", "olora", "corda", "corda_kpm", "loftq")
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


#: bitsandbytes' NF4 code (Dettmers et al. 2023, QLoRA, App. E): the 16 levels, normalised to [-1, 1]
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)


def fake_quantize(W: torch.Tensor, bits: int, block: int = 64) -> torch.Tensor:
    """W quantized and dequantized on any device: ``bits=4`` NF4 with one absmax per ``block`` values
    (bitsandbytes' ``quant_type="nf4"`` layout, round to the nearest level); ``bits=8`` int8 with one
    absmax/127 per row (``Int8Params``' vector-wise scheme)."""
    W = W.float()
    if bits == 8:
        scale = W.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        return torch.round(W / scale).clamp(-127, 127) * scale
    flat = W.reshape(-1)
    pad = (-flat.numel()) % block
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    code = torch.tensor(NF4_CODE, device=W.device)
    idx = torch.argmin((blocks / absmax).unsqueeze(-1).sub(code).abs(), dim=-1)
    return (code[idx] * absmax).reshape(-1)[: flat.numel()].view_as(W)


def loftq(W: torch.Tensor, r: int, bits: int, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ (Li et al. 2023, arXiv:2310.08659, Alg. 1) as PEFT's ``loftq_init`` with a CPU quantizer:
    Q_t = q(W − L_{t−1} R_{t−1}), (L_t, R_t) = top-r SVD of W − Q_t (L = U√S, R = √S Vᵀ). Returns
    (Q, A = R, B = L): the new base is the dequantized Q and, as PEFT, the factors are not divided by s."""
    W = W.float()
    res = W.clone()
    for i in range(iters):
        deq = fake_quantize(res, bits)
        U, S, Vh = torch.linalg.svd(W - deq, full_matrices=False)
        L, R = U[:, :r] * S[:r].sqrt(), S[:r].sqrt().unsqueeze(1) * Vh[:r]
        if i + 1 == iters:
            break
        res = W - L @ R
    return deq, R.contiguous(), L.contiguous()
