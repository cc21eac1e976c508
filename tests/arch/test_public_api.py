"""The public surface: 18 names and 3 namespaces in ``__all__``; the previous release's names still resolve, each
with a DeprecationWarning naming its replacement, and give the same object as its new home."""

from __future__ import annotations

import importlib

import pytest

import lowrank_compiler as lrc

NAMES = {"transform", "adapters", "optimizer", "merge", "unmerge", "lower", "compile", "export", "save", "load",
         "save_adapters", "load_adapters", "load_peft", "print_trainable_parameters", "Spec", "AdapterMethod",
         "register_method", "LrcError", "errors", "adapter_sets", "training"}


def test_all_is_the_stable_surface_and_every_name_resolves():
    assert set(lrc.__all__) == NAMES and len(lrc.__all__) == 21
    for name in lrc.__all__:
        assert getattr(lrc, name) is not None


@pytest.mark.parametrize("old", sorted(lrc._DEPRECATED))
def test_old_names_warn_and_alias_their_new_home(old):
    module, attr, instead = lrc._DEPRECATED[old]
    with pytest.warns(DeprecationWarning, match=rf"lrc\.{old} is deprecated.*use {instead.split('(')[0]}"):
        got = getattr(lrc, old)
    mod = importlib.import_module(module)
    assert got is (getattr(mod, attr) if attr else mod)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'merge_adaptors'"):
        lrc.merge_adaptors  # noqa: B018


def test_namespaces_hold_the_moved_functions():
    assert lrc.adapter_sets.add_adapter is importlib.import_module("lowrank_compiler.adapter_sets.named").add_adapter
    assert lrc.adapter_sets.mixed_batch is importlib.import_module("lowrank_compiler.adapter_sets.mixed").mixed_batch
    assert lrc.training.trainer_optimizers is importlib.import_module(
        "lowrank_compiler.training.optimizer").trainer_optimizers
    assert lrc.training.orth_loss is importlib.import_module("lowrank_compiler.methods.adalora").orth_loss
    assert issubclass(lrc.errors.SpecError, lrc.LrcError)
    assert lrc.Spec.parse("fc*:lora(r=2)").rules[0].method == "lora"
