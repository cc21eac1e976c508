"""One model through the whole lifecycle (issue 21), method family x model family.

transform -> HF Trainer steps with labels -> save -> load -> any call / generate -> lower -> compile ->
ONNX export -> ORT run / generate. The reference at every stage is independent of lrc's graphs: the
stock transformers class loading lrc's merged HF-layout export (``from_pretrained``), and PEFT holding
the same adapters where PEFT has the method (LoRA). Outputs, losses and greedy tokens must be equal.
Stock tiny configs, default flags (dropout on, ``use_cache`` at its default).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.common import trainer_args
from helpers.decoder import batch, make_decoder
from helpers.trainer import Rows

import lowrank_compiler as lrc
from lowrank_compiler.frontend.module import LrcGraphModule

METHODS = {
    "lora": "lora(r=4, alpha=8)", "loraga": "loraga(r=4)", "dora": "dora(r=4, alpha=8)", "vera": "vera(r=8)",
    "adalora": "adalora(init_r=4, target_r=2, total_step=2)", "flora": "flora(r=2)",
}
SITES = {"bert": "attention.self.*", "gpt2": "attn.c_attn", "llama": "self_attn.*", "qwen2": "self_attn.*"}
FAST = {("lora", "bert"), ("lora", "gpt2")}
NEW = 4  # greedy tokens per row


def _bert():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=64, num_labels=2)
    return tf.BertForSequenceClassification(cfg).eval()


def _probe(kind: str) -> dict[str, torch.Tensor]:
    b = batch(seed=99)
    labels = (torch.tensor([0, 1, 1, 0]) if kind == "bert"
              else b["input_ids"].masked_fill(b["attention_mask"] == 0, -100))
    return {**b, "labels": labels}


def _init_data(kind: str) -> list[dict[str, torch.Tensor]]:
    rows = Rows("bert" if kind == "bert" else "gpt2", 8)
    return [{k: torch.stack([rows[i][k] for i in range(j, j + 4)]) for k in rows[0]} for j in (0, 4)]


def _out(model, b) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        o = model(**b)
    return o.logits, o.loss


def _same(got, want, what: str) -> None:
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-4, msg=f"{what}: outputs")
    torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=1e-4, msg=f"{what}: loss")


def _cells():
    for method in METHODS:
        for kind in SITES:
            marks = [] if (method, kind) in FAST else [pytest.mark.slow]
            yield pytest.param(method, kind, marks=marks, id=f"{method}-{kind}")


@pytest.mark.parametrize("method,kind", list(_cells()))
def test_lifecycle(method, kind, tmp_path):
    import transformers as tf

    model = _bert() if kind == "bert" else make_decoder(kind)
    spec = f"{SITES[kind]}:{METHODS[method]}" + ("; classifier:full" if kind == "bert" else "")
    data = _init_data(kind) if method == "loraga" else None
    gm = lrc.transform(model, spec, data=data, loss_fn=(lambda out, b: out.loss) if data else None, progress=False)

    # -- HF Trainer steps with labels: adapters and the head move, exactly what trains is counted ------------
    before = {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}
    assert f"trainable params: {sum(p.numel() for p in before.values()):,} " in gm.print_trainable_parameters()
    trainer = tf.Trainer(model=gm, args=trainer_args(tmp_path / "run", 2),
                         train_dataset=Rows("bert" if kind == "bert" else "gpt2", 8))
    trainer.train()
    moved = {n for n, p in gm.named_parameters() if n in before and not torch.equal(p, before[n])}
    if kind == "bert":
        assert {"classifier.weight", "classifier.bias"} <= moved, "the full head did not train"
    assert any(".adapter." in n for n in moved), "no adapter moved"
    gm.eval()

    # -- the independent reference: the stock class loading lrc's merged HF-layout export ----------------
    lrc.export(gm, tmp_path / "hf", format="hf")
    ref = type(model).from_pretrained(tmp_path / "hf").eval()
    probe = _probe(kind)
    want = _out(ref, probe)
    _same(_out(gm, probe), want, "trained model")
    if method == "lora" and kind != "bert":  # PEFT holds the same adapters
        from peft import PeftModel

        lrc.export(gm, tmp_path / "peft", format="peft")
        base = make_decoder(kind)
        _same(_out(PeftModel.from_pretrained(base, tmp_path / "peft").eval(), probe), want, "PEFT")
    tokens = None
    if kind != "bert":
        prompt = {k: probe[k] for k in ("input_ids", "attention_mask")}
        tokens = ref.generate(**prompt, max_new_tokens=NEW, do_sample=False)
        assert torch.equal(gm.generate(**prompt, max_new_tokens=NEW, do_sample=False), tokens)

    # -- save -> load: the same kind of object, every call, generate ----------------------------------
    lrc.save(gm, tmp_path / "m.lrc")
    loaded = lrc.load(tmp_path / "m.lrc")
    assert isinstance(loaded, LrcGraphModule) and loaded.config.to_dict() == gm.config.to_dict()
    _same(_out(loaded, probe), want, "loaded")
    if tokens is not None:
        assert torch.equal(loaded.generate(**prompt, max_new_tokens=NEW, do_sample=False), tokens)

    # -- lower (speed, memory) and compile: every call the model accepts, parameters shared -------------
    for goal in ("speed", "memory"):
        lowered = lrc.lower(loaded, goal).eval()
        _same(_out(lowered, probe), want, f"lower {goal}")
    if tokens is not None:
        assert torch.equal(lowered.generate(**prompt, max_new_tokens=NEW, do_sample=False), tokens)
    compiled = lrc.compile(loaded, backend="aot_eager")
    _same(_out(compiled, probe), want, "compiled")

    # -- ONNX export of the loaded model -> ONNX Runtime -------------------------------------------------
    from lowrank_compiler.backends.onnx.export import session
    from lowrank_compiler.backends.onnx.generate import ort_generate

    rep = lrc.export(loaded, tmp_path / "m.onnx", merge=True)
    sess = session(tmp_path / "m.onnx", providers="cpu")
    if tokens is None:
        names = [i.name for i in sess.get_inputs()]
        got = sess({n: probe[n].numpy() for n in names})[0]
        np.testing.assert_allclose(got, want[0].numpy(), atol=1e-4, rtol=1e-4)
    else:
        got = ort_generate(sess, prompt["input_ids"], prompt["attention_mask"], max_new_tokens=NEW,
                           eos_token_id=gm.generation_config.eos_token_id)
        assert np.array_equal(got, tokens.numpy()), rep


@pytest.mark.slow
def test_fine_tune_save_then_new_process_loads_and_generates(tmp_path):
    """Nothing of the session that trained is needed: a fresh interpreter loads the file and generates."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    model = make_decoder("llama")
    gm = lrc.transform(model, "self_attn.*:lora(r=4, alpha=8)", progress=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in lrc.adapters(gm).values():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.3)
    prompt = batch(seed=7)
    want = gm.eval().generate(**prompt, max_new_tokens=NEW, do_sample=False)
    lrc.save(gm, tmp_path / "m.lrc")
    torch.save(prompt, tmp_path / "prompt.pt")
    code = ("import json, sys, torch, lowrank_compiler as lrc\n"
            "gm = lrc.load(sys.argv[1]); p = torch.load(sys.argv[2])\n"
            f"print(json.dumps(gm.generate(**p, max_new_tokens={NEW}, do_sample=False).tolist()))\n")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.lrc"), str(tmp_path / "prompt.pt")],
                         capture_output=True, text=True, cwd=root, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == want.tolist()
