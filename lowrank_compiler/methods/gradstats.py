"""Per-site gradient statistics accumulated from a linear's input X and output gradient Δ.

For ``y = x Wᵀ + b`` the weight gradient of one batch is ``G = Δᵀ X`` (tokens flattened), so the
statistics that data-dependent inits need can be accumulated from forward/backward taps without
the base weight requiring grad and without ``.grad`` buffers.

* :class:`ExactGradient` holds G itself (d_out × d_in, fp32): the LoRA-GA authors' statistic.
* :class:`InputCovariance` needs no gradient: Σ x̂ᵀ x̂ over samples, x̂ = x / |max x| (CorDA, as PEFT).
* :class:`GradientSketch` never forms G. It keeps the single-pass two-sided sketch of Tropp,
  Yurtsever, Udell, Cevher (2017), "Practical sketching algorithms for low-rank matrix
  approximation" (SIMAX 38(4), Alg. 1/3/7): range sketch ``Y = G Ω`` (d_out × k) and co-range
  sketch ``Z = Ψ G`` (l × d_in), both linear in G and therefore accumulated batch by batch as
  ``Y += Δᵀ (X Ω)`` and ``Z += (Ψ Δᵀ) X``. Ω and Ψ are Gaussian and regenerated from a seed at
  every update, so the state held between batches is only Y and Z: O((d_out + d_in)·k) floats.
"""

from __future__ import annotations

import torch

from lowrank_compiler.errors import InitError


class GradStats:
    """Accumulator protocol used by ``passes.initialize``.

    ``update(x, dy)`` adds one tap (x: ... × d_in, dy: ... × d_out), ``tensors()`` lists the
    state to all-reduce (AVG) under torch.distributed, ``finish(n_batches)`` turns sums into means.
    ``needs_grad``: False for statistics of the forward pass only (then ``dy`` is None, the pass runs
    the batches in eval mode under no_grad and needs no ``loss_fn``).
    """

    needs_grad: bool = True

    def __init__(self) -> None:
        self.n_batches = 0
        self.updates = 0
        self.nonfinite = torch.zeros((), dtype=torch.bool)

    def update(self, x: torch.Tensor, dy: torch.Tensor) -> None:
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def finish(self, n_batches: int) -> None:
        self.n_batches = n_batches
        if n_batches > 0:
            for t in self.tensors():
                t.div_(n_batches)

    def nbytes(self) -> int:
        """Bytes of state held between batches."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def _flat(self, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.updates += 1
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
        d2 = dy.reshape(-1, dy.shape[-1]).to(torch.float32)
        # one lazy flag per site for non-finite inputs or gradients (no host sync here; checked once per batch)
        self.nonfinite = self.nonfinite.to(d2.device) | ~torch.isfinite(d2.sum()) | ~torch.isfinite(x2.sum())
        return x2, d2


class ExactGradient(GradStats):
    """G = Σ Δᵀ X in fp32 (d_out × d_in): the full gradient of the site's weight."""

    def __init__(self, d_out: int, d_in: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.G = torch.zeros(d_out, d_in, dtype=torch.float32, device=device)

    def update(self, x: torch.Tensor, dy: torch.Tensor) -> None:
        x2, d2 = self._flat(x, dy)
        self.G.addmm_(d2.t(), x2)

    def tensors(self) -> list[torch.Tensor]:
        return [self.G]

    def top(self, q: int, niter: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``torch.svd_lowrank(G, q, niter)`` (as the LoRA-GA authors): U (d_out × q), S, V (d_in × q)."""
        return torch.svd_lowrank(self.G, q=q, niter=niter)


class InputCovariance(GradStats):
    """C = mean over samples of x̂ᵀ x̂ (d_in × d_in, fp32), x̂ = x / |max(x)| per sample: PEFT's
    ``calib_cov_distribution`` (CorDA), where a sample is one forward call of batch size 1. Here a
    sample is one batch row (the last two dims), so batch-1 data gives PEFT's statistic exactly."""

    needs_grad = False

    def __init__(self, d_in: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.C = torch.zeros(d_in, d_in, dtype=torch.float32, device=device)
        self.samples = torch.zeros((), dtype=torch.float32, device=device)

    def update(self, x: torch.Tensor, dy: torch.Tensor | None = None) -> None:
        self.updates += 1
        xs = x.detach().to(torch.float32)
        xs = xs.unsqueeze(0) if xs.dim() == 2 else xs.reshape(-1, *xs.shape[-2:])
        xs = xs / xs.amax(dim=(1, 2), keepdim=True).abs()
        self.nonfinite = self.nonfinite.to(xs.device) | ~torch.isfinite(xs.sum())
        self.C.add_(torch.einsum("btd,bte->de", xs, xs))
        self.samples.add_(xs.shape[0])

    def tensors(self) -> list[torch.Tensor]:
        return [self.C, self.samples]

    def finish(self, n_batches: int) -> None:
        self.n_batches = n_batches  # sums stay sums: the all-reduce averages them, mean() divides

    def mean(self, site: str = "") -> torch.Tensor:
        """The covariance; InitError when no sample reached the site."""
        if float(self.samples) <= 0:
            raise InitError(f"site {site!r}: no input was recorded for CorDA's covariance; pass data=")
        return self.C / self.samples


class GradientSketch(GradStats):
    """Two-sided sketch (Y = G Ω, Z = Ψ G) of G = Σ Δᵀ X; ``k`` range and ``l_cols`` co-range columns."""

    def __init__(self, d_out: int, d_in: int, k: int, l_cols: int, seed: int,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.d_out, self.d_in, self.seed = d_out, d_in, seed
        self.k, self.l = min(k, d_out, d_in), min(l_cols, d_out)
        self.Y = torch.zeros(d_out, self.k, dtype=torch.float32, device=device)
        self.Z = torch.zeros(self.l, d_in, dtype=torch.float32, device=device)

    def test_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Ω d_in × k, Ψ l × d_out), the same on every call and every rank."""
        g = torch.Generator(device=self.Y.device).manual_seed(self.seed)
        omega = torch.randn(self.d_in, self.k, generator=g, device=self.Y.device)
        psi = torch.randn(self.l, self.d_out, generator=g, device=self.Y.device)
        return omega, psi

    def update(self, x: torch.Tensor, dy: torch.Tensor) -> None:
        x2, d2 = self._flat(x, dy)
        omega, psi = self.test_matrices()
        self.Y.addmm_(d2.t(), x2 @ omega)          # Δᵀ (X Ω)
        self.Z.addmm_((d2 @ psi.t()).t(), x2)      # (Ψ Δᵀ) X

    def tensors(self) -> list[torch.Tensor]:
        return [self.Y, self.Z]

    def top(self, q: int, niter: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Leading singular triplets of Ĝ = Q (Ψ Q)⁺ Z, Q = orth(Y) (Tropp et al. 2017, Alg. 7).

        Returns U (d_out × q'), S, V (d_in × q') with q' = min(q, k); ``niter`` is ignored.
        """
        _, psi = self.test_matrices()
        Q, _ = torch.linalg.qr(self.Y)                     # d_out × k
        core = torch.linalg.lstsq(psi @ Q, self.Z).solution  # k × d_in
        Uc, S, Vh = torch.linalg.svd(core, full_matrices=False)
        q = min(q, S.numel())
        return Q @ Uc[:, :q], S[:q], Vh[:q].t()
