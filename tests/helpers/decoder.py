"""Tiny stock decoder LMs (transformers configs, defaults left alone: use_cache=True) and a short training run."""

from __future__ import annotations

import copy

import numpy as np
import torch

import lowrank_compiler as lrc

VOCAB = 100


def make_decoder(kind: str) -> torch.nn.Module:
    """A seeded tiny ``*ForCausalLM`` from a stock config; only sizes and token ids are set."""
    import transformers as tf

    torch.manual_seed(0)
    small = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                 intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=1,
                 eos_token_id=2, pad_token_id=0)
    if kind == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=128, bos_token_id=1,
                            eos_token_id=2, pad_token_id=0)
        return tf.GPT2LMHeadModel(cfg).eval()
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[kind]
    extra = {"sliding_window": 32} if kind == "mistral" else {}  # > prompt + new tokens (see docs/generate.md)
    return cls[1](cls[0](**small, **extra)).eval()


# attention + MLP of each family (PEFT target names: the leaf module names)
SPECS = {
    "gpt2": ("attn.c_attn:lora(r=4, alpha=8); attn.c_proj:lora(r=4, alpha=8); mlp.c_fc:lora(r=4, alpha=8)",
             ["c_attn", "c_proj", "c_fc"]),
    "llama": ("self_attn.*:lora(r=4, alpha=8); mlp.*:lora(r=4, alpha=8)",
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}
SPECS["qwen2"] = SPECS["mistral"] = SPECS["llama"]


def batch(n: int = 4, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded token batch (pad 0) with its attention mask: rows have 12, 9, 7, 12 ... real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    for i in range(n):
        pad = (0, 3, 5, 0)[i % 4]
        ids[i, :pad], mask[i, :pad] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def trained(kind: str, steps: int = 20) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformed model after ``steps`` AdamW steps on next-token loss, an untouched copy of the base)."""
    model = make_decoder(kind)
    base = copy.deepcopy(model)
    gm = lrc.transform(model, SPECS[kind][0])
    opt = lrc.optimizer(gm, lr=1e-2)
    gm.train()
    for step in range(steps):
        b = batch(seed=step)
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        loss = gm(**b, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    gm.eval()
    return gm, base


def greedy_tokens(model: torch.nn.Module, prompt: np.ndarray, new: int) -> np.ndarray:
    """``model.generate``'s greedy tokens for ``prompt`` [batch, seq] (exactly ``new`` steps: no eos, pad 0)."""
    ids = torch.from_numpy(prompt)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return np.asarray(out)


def fill_lora(gm: torch.nn.Module, peft_model: torch.nn.Module | None = None, seed: int = 3,
              std: float = 0.3) -> None:
    """Seeded random non-zero LoRA pairs in ``gm``'s adapters, copied into ``peft_model``'s when given."""
    theirs = dict(peft_model.named_parameters()) if peft_model is not None else {}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site, mod in lrc.adapters(gm).items():
            for which in ("lora_A", "lora_B"):
                p = getattr(mod, which)
                p.copy_(torch.randn(p.shape, generator=g) * std)
                if theirs:
                    theirs[f"base_model.model.{site}.{which}.default.weight"].copy_(p)
