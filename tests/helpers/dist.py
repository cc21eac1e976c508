"""Workers for tests/test_distributed.py: 2 gloo processes on CPU (torchrun), results written as .pt files.

One launch serves every test: lrc.training.distributed's DDP / FSDP2 / LoRA-GA flows, then the HF Trainer
runs of tests/trainer_helpers.py (each process launch costs seconds of imports and a first trace).

The model is a tiny stock BertModel with dropout set to 0 (so one process and two processes draw the
same function; dropout masks differ between layouts by construction). The loss is the mean squared
error of the last hidden state against a fixed target, a mean over examples, so the mean of the two
ranks' losses on their halves equals the loss of the global batch.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import torch

GLOBAL_BATCH, SEQ, STEPS, LR = 4, 8, 4, 1e-2
SPEC = "attention.self.*:lora(r=4, alpha=8)"
GA_SPEC = "attention.self.*:loraga(r=4, alpha=8)"


def bert() -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return tf.BertModel(cfg)


def data(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 100, (GLOBAL_BATCH, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    target = torch.randn(GLOBAL_BATCH, SEQ, 32, generator=g)
    return ids, mask, target


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


def loss_of(gm, ids, mask, target) -> torch.Tensor:
    return (gm(ids, attention_mask=mask).last_hidden_state - target).pow(2).mean()


def init_loader(rank: int, world: int) -> list[dict]:
    """LoRA-GA init batches: the global list is 4 batches; each rank gets its contiguous half."""
    batches = []
    for i in range(4):
        ids, mask, target = data(50 + i)
        batches.append({"input_ids": ids, "attention_mask": mask, "target": target})
    n = len(batches) // world
    return batches[rank * n:(rank + 1) * n]


def build(spec: str, rank: int, world: int):
    import lowrank_compiler as lrc

    ids, mask, _ = data(0)
    kw = {}
    if "loraga" in spec:
        loader = init_loader(rank, world)
        kw = dict(data=_Strip(loader), loss_fn=_GaLoss(loader), init_batches=len(loader))
    return lrc.transform(bert(), spec, example_inputs=(ids,), example_kwargs={"attention_mask": mask},
                         progress=False, **kw)


class _Strip:
    """Yield the batches without the target (the graph takes input_ids, attention_mask)."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __iter__(self):
        for b in self.batches:
            yield {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


class _GaLoss:
    """loss_fn(out, batch): finds the batch's target by identity of its input_ids."""

    def __init__(self, batches: list[dict]) -> None:
        self.by_ids = [(b["input_ids"], b["target"]) for b in batches]

    def __call__(self, out, batch) -> torch.Tensor:
        target = next(t for ids, t in self.by_ids if torch.equal(ids, batch["input_ids"]))
        return (out.last_hidden_state - target).pow(2).mean()


def train(gm, opt, rank: int, world: int, allreduce: bool) -> list[float]:
    import torch.distributed as dist

    losses = []
    gm.train()
    for step in range(STEPS):
        ids, mask, target = (shard(t, rank, world) for t in data(step))
        loss = loss_of(gm, ids, mask, target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        val = loss.detach().clone()
        if allreduce:
            dist.all_reduce(val)
            val /= world
        losses.append(float(val))
    return losses


def single(mode: str, out_dir: str) -> None:
    """The one-process reference on the global batch."""
    import lowrank_compiler as lrc

    if mode == "loraga":  # LoRA-GA's init is defined up to the signs of singular vectors, which may
        # differ between layouts in the last bits of G: train from the init rank 0 saved
        gm = lrc.load(Path(out_dir) / "loraga_init.lrc")
    else:
        gm = build(SPEC, 0, 1)
    init = {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=LR)
    losses = train(gm, opt, 0, 1, allreduce=False)
    ids, mask, _ = data(99)
    gm.eval()
    with torch.no_grad():
        y = gm(ids, attention_mask=mask).last_hidden_state
    torch.save({"losses": losses, "init": init, "y": y}, Path(out_dir) / f"single_{mode}.pt")


def _block0_state(top, seen: list, *_) -> None:
    seen.append([type(p).__name__ for p in top.lrc_block_0.parameters()])


def worker(out_dir: str) -> None:
    """One torchrun rank: DDP, FSDP2 and LoRA-GA + FSDP2 with lrc.training.distributed, then the HF Trainer runs."""
    import copy

    import torch.distributed as dist

    import lowrank_compiler as lrc
    from helpers import trainer as th
    from lowrank_compiler.training import distributed as lrcd

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    out = Path(out_dir)
    res: dict = {}
    try:
        plain = build(SPEC, rank, world)  # traced once; each wrapper trains its own copy
        for mode in ("ddp", "fsdp", "fsdp_block", "loraga"):
            gm = build(GA_SPEC, rank, world) if mode == "loraga" else copy.deepcopy(plain)
            res[f"{mode}_init"] = {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}
            if mode == "loraga":
                lrcd.save(gm, out / "loraga_init.lrc")
            gm_train = gm
            if mode == "ddp":
                fwd = lrcd.ddp(gm)
            else:
                fwd = lrcd.fsdp(gm, per_block=mode == "fsdp_block")
                res[f"{mode}_sharded"] = lrcd.is_sharded(gm)
            if mode == "fsdp_block":  # when block 1 starts, block 0 is back to its shards
                res["fsdp_block_seen"] = []
                fwd.lrc_block_1.register_forward_pre_hook(partial(_block0_state, fwd, res["fsdp_block_seen"]))
            opt = lrc.optimizer(gm_train, torch.optim.AdamW, lr=LR)
            res[f"{mode}_losses"] = train(fwd, opt, rank, world, allreduce=True)
            lrcd.save_adapters(fwd, out / f"{mode}.safetensors")
            if mode == "fsdp":  # the whole model, gathered from the shards (lrc.save re-exports: seconds)
                lrcd.save(fwd, out / f"{mode}.lrc")
        for kind in th.KINDS:
            res[f"trainer_{kind}"] = th.train(kind, out, rank, world)
        res["rank"] = rank
        torch.save(res, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def labels_batch(step: int) -> dict[str, torch.Tensor]:
    """Global batch ``step`` of the BERT classifier rows (4 rows, class labels)."""
    from helpers import trainer as th

    rows = [th.Rows("bert")[4 * step + i] for i in range(GLOBAL_BATCH)]
    return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}


def labels_run(rank: int, world: int, per_block: bool) -> dict:
    """The BERT classifier (LoRA + a ``full`` head) traced for (input_ids, attention_mask), trained with ``labels=``
    (another call signature) for STEPS steps; per_block: through ``fsdp(gm, per_block=True)``'s outlined module.
    Returns the losses (mean over the ranks) and the eval logits of a call without a mask (a third signature)."""
    import torch.distributed as dist

    import lowrank_compiler as lrc
    from helpers import trainer as th
    from lowrank_compiler.training import distributed as lrcd

    b0 = labels_batch(0)
    gm = lrc.transform(*th.model_and_spec("bert"), example_inputs=(b0["input_ids"],),
                       example_kwargs={"attention_mask": b0["attention_mask"]}, progress=False)
    fwd = lrcd.fsdp(gm, per_block=True) if per_block else gm
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=LR)
    losses = []
    fwd.train()
    for step in range(STEPS):
        b = {k: shard(v, rank, world) for k, v in labels_batch(step).items()}
        loss = fwd(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        val = loss.detach().clone()
        if world > 1:
            dist.all_reduce(val)
            val /= world
        losses.append(float(val))
    fwd.eval()
    with torch.no_grad():
        y = fwd(input_ids=th.probe()["input_ids"]).logits
    return {"losses": losses, "y": y, "sharded": lrcd.is_sharded(gm)}


def labels_worker(out_dir: str) -> None:
    """One torchrun rank of the per-block FSDP run with ``labels=``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    try:
        torch.save(labels_run(rank, world, per_block=True), Path(out_dir) / f"labels_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # python -m torch.distributed.run --nproc_per_node 2 tests/helpers/dist.py OUT_DIR [labels]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    (labels_worker if sys.argv[2:] == ["labels"] else worker)(sys.argv[1])
