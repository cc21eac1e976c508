"""torchrun worker for tests/methods/test_inits.py: EVA and CorDA inits under 2 gloo processes.

Each rank feeds its half of every batch; the result (A, B, offset base per site) is saved per rank and
compared with one process on the whole batches: EVA gathers each batch's rows from the ranks (rank
order), CorDA all-reduces its covariance (equal sample counts per rank, so the mean is the global one).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def batches(n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 16, 12, generator=g) * torch.logspace(1, -1, 12) for _ in range(n)]


def run(init: str, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """The init on this rank's half of each batch (every row when world == 1): {site.tensor: value}."""
    import lowrank_compiler as lrc
    from helpers.mlp import make_mlp

    data = [(b.chunk(world)[rank],) for b in batches()]
    gm = lrc.transform(make_mlp(), f"fc*:lora(r=4, alpha=8, init='{init}')", example_inputs=data[0],
                       data=data, progress=False)
    out = {}
    for site, ad in lrc.adapters(gm).items():
        out[f"{site}.A"], out[f"{site}.B"] = ad.lora_A.detach().clone(), ad.lora_B.detach().clone()
        out[f"{site}.W"] = gm.get_parameter(f"{site}.weight").detach().clone()
    return out


def worker(out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        res = {init: run(init, rank, world) for init in ("eva", "corda")}
        torch.save(res, Path(out_dir) / f"inits_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # python -m torch.distributed.run --nproc_per_node 2 tests/helpers/dist_inits.py OUT
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    worker(sys.argv[1])
