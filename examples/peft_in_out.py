"""PEFT in and out: continue a PEFT LoRA (with a modules_to_save head) in lrc, and hand it back to PEFT.

`lrc.load_peft` reads a PEFT adapter directory onto the base model; `lrc.export(gm, dir, format="peft")` writes one that
`peft.PeftModel.from_pretrained` loads with the same outputs.
"""

import peft
import torch
import transformers

import lowrank_compiler as lrc

torch.manual_seed(0)
config = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                                 vocab_size=500, max_position_embeddings=64, num_labels=2)
transformers.BertForSequenceClassification(config).save_pretrained("base")  # the shared base model


def base_model():
    return transformers.AutoModelForSequenceClassification.from_pretrained("base").eval()


ids = torch.randint(0, 500, (4, 10))
mask = torch.ones_like(ids)
labels = torch.tensor([0, 1, 1, 0])

# 1. a PEFT user trains LoRA on query/value and the classifier head, and saves it
pm = peft.get_peft_model(base_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                       modules_to_save=["classifier"]))
opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
for _ in range(3):
    pm(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    opt.step()
    opt.zero_grad()
pm.save_pretrained("peft-adapter")

# 2. lrc picks it up: same outputs, and the head is trainable again (a `full` module)
gm = lrc.load_peft(base_model(), "peft-adapter", example_inputs=(ids,), example_kwargs={"attention_mask": mask})
pm.eval()
with torch.no_grad():
    diff = (gm(ids, mask).logits - pm(input_ids=ids, attention_mask=mask).logits).abs().max()
print(f"lrc.load_peft: max |lrc - PEFT| = {diff:.1e}")
assert diff < 1e-5
lrc.print_trainable_parameters(gm)
opt = lrc.optimizer(gm, torch.optim.AdamW, lr=1e-2)
for _ in range(3):
    torch.nn.functional.cross_entropy(gm(ids, mask).logits, labels).backward()
    opt.step()
    opt.zero_grad()

# 3. back to PEFT
lrc.export(gm, "lrc-adapter", format="peft")
back = peft.PeftModel.from_pretrained(base_model(), "lrc-adapter").eval()
gm.eval()
with torch.no_grad():
    diff = (back(input_ids=ids, attention_mask=mask).logits - gm(ids, mask).logits).abs().max()
print(f"peft.PeftModel.from_pretrained(lrc-adapter): max |PEFT - lrc| = {diff:.1e}")
assert diff < 1e-5
