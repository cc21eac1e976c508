"""The HF Trainer's checkpoints of an lrc model are adapters-only, and a transformers release that changes how
the Trainer saves turns this red (and warns at run time) instead of silently writing full checkpoints.

Reference: ``trained_keys`` against the files a real ``transformers.Trainer`` writes (save_model and a
checkpoint during ``train``), and transformers' own ``Trainer._save``.
"""

from __future__ import annotations

import pytest
import transformers as tf
from helpers import trainer as th
from safetensors.torch import load_file

import lowrank_compiler as lrc
from lowrank_compiler.frontend import checkpoint as ck


def test_lrc_recognises_this_transformers_trainer_save():
    """What the detection relies on: ``Trainer._save`` exists and reads ``model.state_dict()``."""
    assert callable(getattr(tf.Trainer, "_save", None)), f"transformers {tf.__version__} renamed Trainer._save"
    assert "state_dict" in tf.Trainer._save.__code__.co_names
    assert ck.trainer_save_code() is tf.Trainer._save.__code__
    assert ck.trainer_save_known()


@pytest.mark.slow
def test_save_model_and_checkpoint_are_adapters_only(tmp_path):
    """A real Trainer run (tiny BERT classifier: LoRA + a ``full`` head) with a checkpoint at step 1, then
    ``save_model``: both files hold exactly what training changes; ``state_dict()`` elsewhere is complete."""
    gm = lrc.transform(*th.model_and_spec("bert"), progress=False)
    args = th.training_args("bert", tmp_path, 1, max_steps=1, save_strategy="steps", save_steps=1)
    trainer = tf.Trainer(model=gm, args=args, train_dataset=th.Rows("bert"))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    want = ck.trained_keys(gm)
    assert any(k.startswith("classifier.") for k in want) and any("adapter" in k for k in want)
    for f in (tmp_path / "checkpoint-1" / "model.safetensors", tmp_path / "final" / "model.safetensors"):
        assert set(load_file(f)) == want, f
    assert set(gm.state_dict()) > want  # not from the Trainer: torch's whole state dict


def test_an_unrecognised_trainer_save_warns(monkeypatch):
    """A transformers whose ``Trainer._save`` no longer calls ``state_dict`` (a rename or a rewrite): lrc says that
    checkpoints will hold the whole model, once, instead of silently writing them."""

    def _save(self, output_dir=None, state_dict=None):  # a stand-in that never calls model.state_dict()
        return output_dir

    monkeypatch.setattr(tf.Trainer, "_save", _save)
    monkeypatch.setattr(ck, "_known", {})
    with pytest.warns(ck.LrcWarning, match="hold the whole model"):
        assert not ck.trainer_save_known()
    assert not ck.called_by_trainer_save()  # and nothing is filtered
