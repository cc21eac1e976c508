"""DDP, FSDP2 and the HF Trainer on transformed graphs: 2 gloo processes on CPU against one process.

One torchrun job (tests/dist_helpers.py) trains with DDP, FSDP2 and LoRA-GA + FSDP2, then with
``transformers.Trainer`` (its own DDP), and saves checkpoints from rank 0; the reference is the same
training in this process on the global batch.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowrank_compiler as lrc
from lowrank_compiler.training import distributed as lrcd

HERE = Path(__file__).resolve().parents[1]  # tests/
sys.path.insert(0, str(HERE))
from helpers import dist as dh  # noqa: E402
from helpers import trainer as th  # noqa: E402

MODES = ("ddp", "fsdp", "fsdp_block", "loraga")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(HERE / "helpers" / "dist.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    for mode in ("ddp", "loraga"):
        dh.single(mode, str(out))
    return out, ranks


@pytest.mark.parametrize("mode", MODES)
def test_loss_curve_equals_one_process(runs, mode):
    out, ranks = runs
    ref = torch.load(out / f"single_{'loraga' if mode == 'loraga' else 'ddp'}.pt")
    for r in ranks:
        assert r[f"{mode}_losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
    assert ref["losses"][-1] < ref["losses"][0]  # it trained
    if mode != "ddp":
        assert all(r[f"{mode}_sharded"] for r in ranks)
    if mode == "fsdp_block":  # one block unsharded at a time: block 0 resharded before block 1 runs
        for r in ranks:
            assert len(r["fsdp_block_seen"]) == dh.STEPS
            assert all(set(names) == {"DTensor"} for names in r["fsdp_block_seen"]), r["fsdp_block_seen"][0]


def test_loraga_statistics_allreduced_under_fsdp(runs):
    """Each rank saw only its half of the init batches; the all-reduced init equals one process on all."""
    _, ranks = runs
    one = {n: p.detach() for n, p in dh.build(dh.GA_SPEC, 0, 1).named_parameters() if p.requires_grad}
    half = {n: p.detach() for n, p in dh.build(dh.GA_SPEC, 0, 2).named_parameters() if p.requires_grad}
    for r in ranks:  # ranks agree bitwise (rank 0 broadcasts), and equal one process up to SVD signs
        assert r["loraga_init"].keys() == one.keys()
        for k in one:
            torch.testing.assert_close(r["loraga_init"][k], ranks[0]["loraga_init"][k], rtol=0, atol=0)
            assert _up_to_sign(r["loraga_init"][k], one[k]) < 1e-5, k
    # a rank alone (half the init batches) draws a different init: the all-reduce mattered
    assert max(_up_to_sign(half[k], one[k]) for k in one) > 1e-2


def _up_to_sign(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| after flipping each singular direction (rows of A r×d_in, columns of B d_out×r)."""
    dim = 1 if a.shape[0] < a.shape[1] else 0
    s = torch.sign((a * b).sum(dim, keepdim=True))
    return float((a - s * b).abs().max())


@pytest.mark.parametrize("mode", MODES)
def test_rank0_checkpoints_load_in_one_process(runs, mode):
    """DDP: adapters into a fresh transform; FSDP2: the whole gathered model and its adapters; LoRA-GA:
    its adapters on the init model rank 0 saved (the init moved the base)."""
    out, _ = runs
    ref = torch.load(out / f"single_{'loraga' if mode == 'loraga' else 'ddp'}.pt")
    ids, mask, _ = dh.data(99)
    models = [lrc.load(out / "fsdp.lrc")] if mode == "fsdp" else []
    fresh = lrc.load(out / "loraga_init.lrc") if mode == "loraga" else dh.build(dh.SPEC, 0, 1)
    models.append(lrc.load_adapters(fresh, out / f"{mode}.safetensors"))
    with torch.no_grad():
        for gm in models:
            torch.testing.assert_close(gm.eval()(ids, attention_mask=mask).last_hidden_state, ref["y"],
                                       rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def trainer_single(tmp_path_factory):
    """The HF Trainer runs in this process on the global batch (4 rows per step); GPT-2 checkpoints at step 2."""
    out = tmp_path_factory.mktemp("trainer1")
    res = {kind: th.train(kind, out, 0, 1, checkpoint_every=2 if kind == "gpt2" else None) for kind in th.KINDS}
    res["out"] = out
    return res


@pytest.mark.parametrize("kind", th.KINDS)
def test_hf_trainer_under_torchrun_equals_one_process(runs, trainer_single, kind):
    """transformers.Trainer wraps the lrc graph in DDP itself; labels in the batches; same loss curve,
    same trained adapters (and classifier head) as one process."""
    _, ranks = runs
    one = trainer_single[kind]
    init = dict(lrc.transform(*th.model_and_spec(kind), progress=False).named_parameters())
    assert len(one["losses"]) == th.STEPS
    for r in ranks:
        got = r[f"trainer_{kind}"]
        assert got["wrapper"] == "DistributedDataParallel"
        assert got["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
        assert got["trained"].keys() == one["trained"].keys()
        for k, v in one["trained"].items():
            torch.testing.assert_close(got["trained"][k], v, rtol=1e-4, atol=1e-6)
            assert (v - init[k]).abs().max() > 1e-4, k  # it trained
        torch.testing.assert_close(got["y"], one["y"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", th.KINDS)
def test_hf_trainer_save_model_rank0_loads_in_one_process(runs, trainer_single, kind):
    """trainer.save_model() writes model.safetensors on rank 0 only (tied LM head listed once); it loads
    with load_state_dict into a fresh transform, and lrc.training.distributed.save_adapters' file with load_adapters."""
    from safetensors.torch import load_file

    out, _ = runs
    assert (out / f"{kind}_rank0" / "model.safetensors").is_file()
    assert not (out / f"{kind}_rank1").exists()
    probe, want = th.probe(), trainer_single[kind]["y"]
    fresh = lrc.transform(*th.model_and_spec(kind), progress=False)
    with pytest.raises(lrc.errors.LoadError, match=r"Trainer's model.safetensors.*load_state_dict"):
        lrc.load_adapters(fresh, out / f"{kind}_rank0" / "model.safetensors")
    fresh.load_state_dict(load_file(out / f"{kind}_rank0" / "model.safetensors"))
    fresh2 = lrc.load_adapters(lrc.transform(*th.model_and_spec(kind), progress=False), out / f"{kind}_w2.safetensors")
    with torch.no_grad():
        for gm in (fresh, fresh2):
            torch.testing.assert_close(gm.eval()(**probe).logits, want, rtol=1e-4, atol=1e-5)


def test_hf_trainer_resumes_from_its_checkpoint(trainer_single, tmp_path):
    """The Trainer's checkpoint of the tied GPT-2 graph (state dict, optimizer, scheduler) at step 2 of 4
    resumes into a fresh transform and ends where the uninterrupted run ended."""
    import transformers as tf

    kind = "gpt2"
    ckpt = trainer_single["out"] / f"{kind}_rank0" / "checkpoint-2"
    assert (ckpt / "model.safetensors").is_file()
    gm = lrc.transform(*th.model_and_spec(kind), progress=False)
    args = th.training_args(kind, tmp_path, 1)
    tf.Trainer(model=gm, args=args, train_dataset=th.Rows(kind)).train(resume_from_checkpoint=str(ckpt))
    for n, p in gm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, trainer_single[kind]["trained"][n], rtol=1e-5, atol=1e-7)


def test_fsdp_refuses_step_rules_on_shards():
    gm = lrc.transform(dh.bert(), "attention.self.query:lora_pro(r=4); attention.self.value:lora(r=4)",
                       example_inputs=(dh.data(0)[0],))
    with pytest.raises(lrc.LrcError, match=r"lora_pro.*use lrc.training.distributed.ddp"):
        lrcd.fsdp(gm)


def test_wrappers_need_a_process_group():
    gm = lrc.transform(dh.bert(), dh.SPEC, example_inputs=(dh.data(0)[0],))
    with pytest.raises(lrc.LrcError, match="init_process_group"):
        lrcd.ddp(gm)
    with pytest.raises(lrc.LrcError, match="GraphModule"):
        lrcd.fsdp(torch.nn.Linear(2, 2))


def test_outline_blocks_same_function_one_unit_per_block():
    """The lowering behind fsdp(per_block=True): each block's weights and adapters live in (and are read by)
    its own called submodule; outputs and adapter gradients equal the flat graph's."""
    from lowrank_compiler.lowerings.outline import outline_blocks

    gm = dh.build(dh.SPEC, 0, 1).train()
    top, units = outline_blocks(gm)
    assert list(units) == ["lrc_pre", "lrc_block_0", "lrc_block_1", "lrc_post"]
    flat = dict(gm.named_parameters())
    owner = {"lrc_pre": "embeddings.", "lrc_block_0": "encoder.layer.0.", "lrc_block_1": "encoder.layer.1.",
             "lrc_post": "pooler."}
    for unit, prefix in owner.items():  # every parameter in exactly one unit, under its own path
        own = dict(top.get_submodule(unit).named_parameters())
        assert own and all(k.startswith(prefix) and v is flat[k] for k, v in own.items())
        assert len(own) == sum(k.startswith(prefix) for k in flat)
    assert sum(1 for _ in top.parameters()) == len(flat)
    assert not any(n.op == "get_attr" for n in top.graph.nodes if isinstance(flat.get(str(n.target)), torch.Tensor))
    ids, mask, target = dh.data(1)
    trainable = [p for p in gm.parameters() if p.requires_grad]
    grads = []
    for mod in (gm, top):
        loss = dh.loss_of(mod, ids, mask, target)
        grads.append(torch.autograd.grad(loss, trainable))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(lrc.LrcError, match="no numbered blocks"):
        outline_blocks(lrc.transform(torch.nn.Sequential(torch.nn.Linear(4, 4)), "0:lora(r=2)",
                                     example_inputs=(torch.randn(2, 4),)))


def test_outline_keeps_a_tied_weight_in_the_root():
    """GPT-2's LM head is the embedding matrix (read before and after the blocks): it stays on top."""
    from helpers.decoder import SPECS, batch, make_decoder

    from lowrank_compiler.lowerings.outline import outline_blocks

    gm = lrc.transform(make_decoder("gpt2"), SPECS["gpt2"][0], progress=False).eval()
    top, units = outline_blocks(gm)
    assert list(units) == ["lrc_pre", "lrc_block_0", "lrc_block_1", "lrc_post"]
    assert [n for n, _ in top.named_parameters() if not n.startswith("lrc_")] == ["lm_head.weight"]
    b = batch(4)
    with torch.no_grad():
        torch.testing.assert_close(top(b["input_ids"], b["attention_mask"]).logits, gm(**b).logits, rtol=0, atol=0)


@pytest.fixture(scope="module")
def labels_runs(tmp_path_factory):
    """2 gloo processes train the BERT classifier through ``fsdp(gm, per_block=True)`` with ``labels=``."""
    out = tmp_path_factory.mktemp("dist_labels")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(HERE / "helpers" / "dist.py"), str(out), "labels"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"labels_rank{r}.pt") for r in range(2)]


@pytest.mark.slow
def test_per_block_fsdp_serves_labels_and_other_signatures(labels_runs):
    """The outlined per-block FSDP2 module was traced for (input_ids, attention_mask); calls with ``labels=`` train
    through the same units and sharded parameters (LoRA and the ``full`` head) as one process's flat graph does on the
    global batch, and a call without a mask after training gives the same logits."""
    one = dh.labels_run(0, 1, per_block=False)
    with torch.no_grad():  # it trained: the head and adapters moved the logits
        y0 = lrc.transform(*th.model_and_spec("bert"), progress=False).eval()(input_ids=th.probe()["input_ids"]).logits
    assert (one["y"] - y0).abs().max() > 1e-3
    for r in labels_runs:
        assert r["sharded"]
        assert r["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
        torch.testing.assert_close(r["y"], one["y"], rtol=1e-4, atol=1e-5)
