"""HF ``Trainer`` workloads for tests/test_distributed.py: run under torchrun (2 gloo ranks) and in one process.

Stock tiny configs with dropout 0 (one and two processes then compute the same function), batches
that carry labels, the Trainer's defaults (AdamW, linear decay, its own DDP wrapping, random sampler
seeded by ``args.seed``). ``per_device_train_batch_size * world == 4`` on every layout, so both see
the same global batches in the same order.

The causal LM runs with the default ``average_tokens_across_devices=True``: its loss divides by the
global ``num_items_in_batch`` (left padding makes the ranks' token counts differ) and the Trainer
multiplies by the world size, so two ranks equal one process exactly. The classifier's loss is a
mean over its own rows and ignores ``num_items_in_batch``, yet the Trainer would still multiply it by
the world size (the stock ``BertForSequenceClassification`` logs 2x under torchrun too); it runs with
``average_tokens_across_devices=False``, where DDP's gradient average is the global-batch gradient.
"""

from __future__ import annotations

from pathlib import Path

import torch

KINDS = ("bert", "gpt2")
STEPS, ROWS = 4, 16


def model_and_spec(kind: str) -> tuple[torch.nn.Module, str]:
    """A seeded tiny stock HF model (dropout 0) and the spec trained on it."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "bert":
        cfg = tf.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                            vocab_size=100, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        return tf.BertForSequenceClassification(cfg), "attention.self.*:lora(r=4, alpha=8); classifier:full"
    cfg = tf.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=100, n_positions=64, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return tf.GPT2LMHeadModel(cfg), "attn.c_attn:lora(r=4, alpha=8); mlp.c_fc:lora(r=4, alpha=8)"


class Rows(torch.utils.data.Dataset):
    """Seeded rows of 8 token ids, left-padded by 0-2 tokens, with labels (class ids or next tokens)."""

    def __init__(self, kind: str, n: int = ROWS) -> None:
        self.kind, self.n = kind, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.randint(3, 100, (8,), generator=torch.Generator().manual_seed(i))
        m = torch.ones_like(x)
        x[:i % 3], m[:i % 3] = 0, 0
        label = x.masked_fill(m == 0, -100) if self.kind == "gpt2" else torch.tensor(i % 2)
        return {"input_ids": x, "attention_mask": m, "labels": label}


def probe() -> dict[str, torch.Tensor]:
    """A held-out batch (no labels) to compare trained models by their outputs."""
    rows = [Rows("bert", 40)[i] for i in range(32, 36)]
    return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}


def training_args(kind: str, out_dir: Path, world: int, **kw):
    """The runs' TrainingArguments: 4 rows per global step, logging every step, nothing reported."""
    import transformers as tf

    kw = {"save_strategy": "no", "max_steps": STEPS, **kw}
    return tf.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=4 // world, learning_rate=1e-2, logging_steps=1,
        report_to=[], use_cpu=True, disable_tqdm=True, average_tokens_across_devices=kind == "gpt2",
        ddp_backend="gloo" if world > 1 else None, **kw)


def train(kind: str, out_dir: Path, rank: int, world: int, checkpoint_every: int | None = None) -> dict:
    """Train with ``transformers.Trainer``; ``trainer.save_model`` into ``out_dir/<kind>_rank<rank>``
    (a directory per rank, so the test sees who wrote) and ``lrc.training.distributed.save_adapters``; with
    ``checkpoint_every`` the Trainer also writes its checkpoints there."""
    import transformers as tf

    import lowrank_compiler as lrc
    from lowrank_compiler.training import distributed as lrcd

    model, spec = model_and_spec(kind)
    gm = lrc.transform(model, spec, progress=False)
    ckpt = {"save_strategy": "steps", "save_steps": checkpoint_every} if checkpoint_every else {}
    trainer = tf.Trainer(model=gm, args=training_args(kind, out_dir / f"{kind}_rank{rank}", world, **ckpt),
                         train_dataset=Rows(kind))
    trainer.train()
    trainer.save_model()
    lrcd.save_adapters(trainer.model_wrapped, out_dir / f"{kind}_w{world}.safetensors")
    gm.eval()
    with torch.no_grad():
        y = gm(**probe()).logits
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "wrapper": type(trainer.model_wrapped).__name__, "y": y,
            "trained": {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}}
