"""Export a fine-tuned model merged: ONNX for ONNX Runtime, and a Hugging Face directory for transformers.

A tiny BERT classifier saved as an HF directory stands in for yours. `lrc.export(..., merge=True)` folds
every adapter into its weight; the ONNX model returns the classifier's logits, checked here against torch.
"""

import numpy as np
import onnxruntime as ort
import torch
import transformers

import lowrank_compiler as lrc

torch.manual_seed(0)
config = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                                 vocab_size=500, max_position_embeddings=64, num_labels=3)
transformers.BertForSequenceClassification(config).save_pretrained("my-classifier")  # your HF directory

model = transformers.AutoModelForSequenceClassification.from_pretrained("my-classifier").eval()
ids = torch.randint(0, 500, (4, 12))
mask = torch.ones_like(ids)
labels = torch.tensor([0, 1, 2, 1])
gm = lrc.transform(model, "attention.self.*:lora(r=8, alpha=16); classifier:full",
                   example_inputs=(ids,), example_kwargs={"attention_mask": mask})

opt = lrc.optimizer(gm, torch.optim.AdamW, lr=1e-2)  # a few steps of "training"
for _ in range(5):
    loss = torch.nn.functional.cross_entropy(gm(ids, mask).logits, labels)
    loss.backward()
    opt.step()
    opt.zero_grad()

report = lrc.export(gm, "classifier.onnx", merge=True)  # validated in ONNX Runtime on the example inputs
print(f"wrote {report['path']}: outputs {report['outputs']}, max |ORT - torch| = {report['max_abs_diff']:.1e}")

sess = ort.InferenceSession("classifier.onnx", providers=["CPUExecutionProvider"])  # plain ORT, any batch/seq
new_ids = torch.randint(0, 500, (2, 7))
new_mask = torch.ones_like(new_ids)
(logits,) = sess.run(["logits"], {"input_ids": new_ids.numpy(), "attention_mask": new_mask.numpy()})
gm.eval()
with torch.no_grad():
    want = gm(new_ids, new_mask).logits.numpy()
print(f"ORT logits {logits.shape}, max |ORT - torch| = {np.abs(logits - want).max():.1e}")
assert np.abs(logits - want).max() < 1e-4

lrc.export(gm, "merged-classifier", format="hf")  # config.json + model.safetensors, no adapters left
back = transformers.AutoModelForSequenceClassification.from_pretrained("merged-classifier").eval()
with torch.no_grad():
    diff = (back(input_ids=new_ids, attention_mask=new_mask).logits.numpy() - want).__abs__().max()
print(f"transformers reloads merged-classifier/: max |dlogit| = {diff:.1e}")
assert diff < 1e-4
