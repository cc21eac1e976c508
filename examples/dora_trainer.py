"""DoRA on a decoder, trained by the Hugging Face Trainer, then merged.

A tiny Llama built from a config (no download). The graph is traced with `labels`, so it returns the
model's own loss and the Trainer drives it unchanged; `lrc.training.trainer_optimizers` gives the Trainer an
optimizer that also runs each method's update rules.
"""

import torch
import transformers

import lowrank_compiler as lrc

torch.manual_seed(0)
config = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                                  intermediate_size=128, vocab_size=128, max_position_embeddings=64)
model = transformers.LlamaForCausalLM(config)

# a toy language: token t is followed by t + 1
starts = torch.randint(0, 100, (16, 1))
ids = (starts + torch.arange(12)) % 128
mask = torch.ones_like(ids)
dataset = [{"input_ids": i, "attention_mask": m, "labels": i} for i, m in zip(ids, mask)]

# today the graph takes exactly the traced inputs; use_cache=False keeps the KV cache out of the trace
gm = lrc.transform(model, "self_attn.*:dora(r=4); mlp.*:dora(r=4)", example_inputs=(ids[:2],),
                   example_kwargs={"attention_mask": mask[:2], "labels": ids[:2], "use_cache": False})
lrc.print_trainable_parameters(gm)

args = transformers.TrainingArguments(output_dir="dora-out", max_steps=8, per_device_train_batch_size=4,
                                      learning_rate=5e-3, use_cpu=True, report_to=[], save_strategy="no",
                                      logging_steps=4, remove_unused_columns=False, disable_tqdm=True)
trainer = transformers.Trainer(model=gm, args=args, train_dataset=dataset,
                               optimizers=lrc.training.trainer_optimizers(gm, lr=5e-3))
trainer.train()
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print("training loss:", " -> ".join(f"{x:.3f}" for x in losses))
assert losses[-1] < losses[0]

merged = lrc.merge(gm)  # DoRA folded into plain weights: same outputs, no adapter cost
gm.eval()
with torch.no_grad():
    diff = (merged(ids[:2], mask[:2], ids[:2]).logits - gm(ids[:2], mask[:2], ids[:2]).logits).abs().max()
print(f"merged vs unmerged: max |dlogit| = {diff:.2e}")
assert diff < 1e-4
