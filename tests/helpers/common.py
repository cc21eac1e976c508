"""Small HF models built from configs (no downloads), example inputs and Trainer arguments."""

from __future__ import annotations

import torch

VOCAB = 100


def make_hf(kind: str) -> torch.nn.Module:
    """A tiny randomly initialized HF model: 'gpt2', 'bert' or 'llama' (eval mode, seeded)."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=64, use_cache=False,
                            bos_token_id=0, eos_token_id=0)
        return tf.GPT2Model(cfg).eval()
    if kind == "bert":
        cfg = tf.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                            vocab_size=VOCAB, max_position_embeddings=64)
        return tf.BertModel(cfg).eval()
    if kind == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=32,
                             intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False,
                             bos_token_id=0, eos_token_id=0)
        return tf.LlamaModel(cfg).eval()
    raise ValueError(kind)


ATTN_SPEC = {
    "gpt2": "attn.c_attn:lora(r=4, alpha=8); attn.c_proj:lora(r=4, alpha=8)",
    "bert": "attention.self.*:lora(r=4, alpha=8)",
    "llama": "self_attn.*:lora(r=4, alpha=8)",
}


def example_ids(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def hidden(out) -> torch.Tensor:
    """last_hidden_state of an HF output (or the tensor itself)."""
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0] if isinstance(out, tuple) else out


class TinyMLP(torch.nn.Module):
    """Two linears (8 -> 16 -> 8, with biases): the smallest model with two adapter sites."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def tiny_bert_classifier():
    """(tiny seeded BertForSequenceClassification, example ids, example kwargs with mask and labels)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=64, num_labels=2)
    model = tf.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 100, (4, 8))
    return model, ids, {"attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}


class LabeledIds(torch.utils.data.Dataset):
    """``n`` seeded rows of 8 token ids with a mask and a 0/1 label: what an HF Trainer batch carries."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        x = torch.randint(0, 100, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.tensor(i % 2)}


def trainer_args(tmp_path, max_steps: int):
    """TrainingArguments for a short CPU run that writes and reports nothing."""
    import transformers as tf

    return tf.TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                                learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                remove_unused_columns=False, disable_tqdm=True)
