"""Serve several adapters from one ONNX Runtime session, switched per run (ORT's native LoRA adapters).

Two task adapters are trained on the same base; `lrc.export` writes the base graph once with each LoRA
pair as an overridable input, plus one `.onnx_adapter` file per task.
"""

import numpy as np
import torch
import transformers

import lowrank_compiler as lrc

torch.manual_seed(0)
config = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                                 vocab_size=500, max_position_embeddings=64)
base = transformers.BertModel(config).eval()
ids = torch.randint(0, 500, (4, 10))
mask = torch.ones_like(ids)
SPEC = "attention.self.query:lora(r=4, alpha=8); attention.self.value:lora(r=4, alpha=8)"


def train_task(target: float, path: str):
    """Adapters that push hidden feature 0 towards ``target``; saved to ``path``."""
    gm = lrc.transform(base, SPEC, example_inputs=(ids,), example_kwargs={"attention_mask": mask})
    opt = lrc.optimizer(gm, torch.optim.AdamW, lr=1e-2)
    for _ in range(5):
        loss = (gm(ids, mask).last_hidden_state[..., 0] - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    lrc.save_adapters(gm, path)
    return gm


task_a = train_task(2.0, "task_a.safetensors")
task_b = train_task(-2.0, "task_b.safetensors")

# one base graph + adapters/task_a.onnx_adapter (the model's own) + adapters/task_b.onnx_adapter (converted)
report = lrc.export(task_a, "base.onnx", adapters_dir="adapters", adapter_name="task_a",
                    extra_adapters=["task_b.safetensors"])
print("wrote", report["path"], "and", ", ".join(report["adapters"]))

sess = lrc.backends.onnx.session("base.onnx", providers="cpu")
feeds = {"input_ids": ids, "attention_mask": mask}
for name, gm in (("task_a", task_a), ("task_b", task_b)):
    (got, *_) = sess(feeds, adapter=f"adapters/{name}.onnx_adapter")
    with torch.no_grad():
        want = gm.eval()(ids, mask).last_hidden_state.numpy()
    print(f"{name}: mean feature 0 = {got[..., 0].mean():+.2f}, max |ORT - torch| = {np.abs(got - want).max():.1e}")
    assert np.abs(got - want).max() < 1e-4
(got, *_) = sess(feeds)  # no adapter: exactly the base model
with torch.no_grad():
    want = base(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
print(f"no adapter: mean feature 0 = {got[..., 0].mean():+.2f}, max |ORT - base| = {np.abs(got - want).max():.1e}")
assert np.abs(got - want).max() < 1e-4
