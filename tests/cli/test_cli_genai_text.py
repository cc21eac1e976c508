"""Text in/out through onnxruntime-genai: `lrc run FOLDER --generate N --prompt TEXT` prints what torch's
``tokenizer.decode(model.generate(**tokenizer(prompt)), skip_special_tokens=True)`` gives, greedy, for the
base and with an adapter (LoRA and DoRA), and its sampling options reach genai (top_k=1 is greedy, a seed
repeats). The tokenizer is a real Llama-2-style BPE (`tokenizers`, trained here on inline text, BOS added
by its post-processor) saved with ``save_pretrained`` beside a tiny stock Llama."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lowrank_compiler as lrc
from lowrank_compiler.cli import main

pytest.importorskip("onnxruntime_genai")
pytestmark = pytest.mark.slow  # one decoder export (~30 s idle, ~2 min on a loaded 2-core host)

TEXT = ("the quick brown fox jumps over the lazy dog while a small cat sleeps on the warm mat near the old red "
        "door and the birds sing in the tall green trees every morning before the sun rises over the quiet hills "
        "where farmers walk to their fields with bread and water for the long day of work ahead of them")
PROMPT = "the small fox sleeps near the door"
NEW = 8
SPEC = "self_attn.q_proj:lora(r=4, alpha=8); self_attn.v_proj:lora(r=4, alpha=8); mlp.down_proj:lora(r=4, alpha=8)"


def llama_tokenizer(out):
    """A Llama-2-style BPE: ▁ for spaces by normalizer (no pre-tokenizer), BOS by a template post-processor,
    <unk>/<s>/</s> = 0/1/2; the merges are learned per word, then the word split is dropped as Llama's is."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    words = Tokenizer(models.BPE())
    words.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    words.train_from_iterator([TEXT] * 3, trainers.BpeTrainer(vocab_size=140, show_progress=False))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for piece, _ in sorted(words.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    spec = json.loads(words.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out)
    return tf.AutoTokenizer.from_pretrained(out)


def _perturb(gm, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in lrc.adapters(gm).values():
            for _, p in mod.named_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import transformers as tf

    hf = tmp_path_factory.mktemp("hf")
    tok = llama_tokenizer(hf)
    assert tok(PROMPT).input_ids[0] == 1 and tok.unk_token_id not in tok(PROMPT).input_ids
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                         intermediate_size=64, vocab_size=len(tok), max_position_embeddings=128, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    model = tf.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(hf)
    base = copy.deepcopy(model)
    gm = lrc.transform(model, SPEC)
    _perturb(gm, 1)
    lrc.adapter_sets.add_adapter(gm, "dora", SPEC.replace("lora(", "dora(dropout=0.0, "))
    lrc.adapter_sets.set_adapter(gm, "dora")
    _perturb(gm, 2)
    lrc.adapter_sets.set_adapter(gm, "default")
    out = tmp_path_factory.mktemp("genai") / "llama"
    report = lrc.export(gm, out, format="genai", adapter_name="tuned", tokenizer=hf)
    assert "tokenizer.json" in report["tokenizer"]
    return tok, base, gm, out


def _texts(capsys, argv) -> dict[str, str]:
    """``{label: printed text}`` of one `lrc run --generate --prompt` call (one prompt)."""
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    return {lines[i].split(":")[0]: lines[i + 1][2:] for i in range(0, len(lines), 2)}


def _torch_text(tok, model) -> str:
    ids = model.generate(**tok(PROMPT, return_tensors="pt"), max_new_tokens=NEW, do_sample=False)[0]
    return tok.decode(ids, skip_special_tokens=True)


def test_prompt_text_equals_torch_base_and_adapters(folder, capsys):
    tok, base, gm, out = folder
    got = _texts(capsys, ["run", str(out), "--generate", str(NEW), "--prompt", PROMPT, "--adapter", "tuned",
                          "--adapter", "dora"])
    want = {"base/merged": _torch_text(tok, base), "tuned": _torch_text(tok, gm)}
    lrc.adapter_sets.set_adapter(gm, "dora")
    want["dora"] = _torch_text(tok, gm)
    lrc.adapter_sets.set_adapter(gm, "default")
    assert got == want
    assert len(set(want.values())) == 3 and all(t.startswith(PROMPT) for t in want.values())


def test_sampling_options_reach_genai(folder, capsys):
    _, _, _, out = folder
    argv = ["run", str(out), "--generate", str(NEW), "--prompt", PROMPT, "--adapter", "tuned"]
    greedy = _texts(capsys, argv)
    assert _texts(capsys, [*argv, "--sample", "--top-k", "1", "--seed", "5"]) == greedy
    hot = [*argv, "--sample", "--top-k", "0", "--temperature", "5.0", "--seed", "3"]
    first = _texts(capsys, hot)
    assert _texts(capsys, hot) == first  # same seed, same tokens (genai's own RNG: not torch's tokens)
    assert first != greedy
