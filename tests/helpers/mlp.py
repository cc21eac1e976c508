"""Small MLPs shared by the method, training and export tests."""

from __future__ import annotations

import torch
from torch import nn

import lowrank_compiler as lrc


class MLP(nn.Module):
    """Three linears of different shapes (VeRA slices its shared pair), biases on two."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 16, bias=False)
        self.fc3 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))


def make_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


def inputs(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 12, generator=torch.Generator().manual_seed(seed))


def batch(i: int):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(6, 12, generator=g), torch.randn(6, 10, generator=g)


def _lora_pro_setup(mode: str):
    model = make_mlp()
    gm = lrc.transform(model, f"fc2:lora_pro(r=4, alpha=8, mode='{mode}')", example_inputs=(inputs(),))
    ad = lrc.adapters(gm)["fc2"]
    with torch.no_grad():
        ad.lora_B.normal_(0, 0.3)
    w = gm.get_parameter("fc2.weight")
    w.requires_grad_(True)  # to read G = ∂L/∂W, what full fine-tuning would see
    x, t = batch(0)
    (gm(x) - t).pow(2).mean().backward()
    G = w.grad.detach().clone()
    w.requires_grad_(False)
    w.grad = None
    return gm, ad, G


def _proj(A, B, M):
    pb = B @ torch.linalg.inv(B.T @ B) @ B.T
    pa = A.T @ torch.linalg.inv(A @ A.T) @ A
    return pb @ M + M @ pa - pb @ M @ pa


class UpDown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))
