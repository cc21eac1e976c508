"""The spec language: parsing, precedence, matching, and errors that point at the fault."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_compiler import SpecError, parse_spec
from lowrank_compiler.spec.language import Spec


def test_parse_rules_and_defaults():
    s = parse_spec("attn.*:lora(r=4, alpha=16); mlp.fc*:lora\n!h.1.*")
    assert len(s.rules) == 3
    a, b, c = s.rules
    assert (a.pattern, a.method, a.args["r"], a.args["alpha"], a.args["dropout"]) == ("attn.*", "lora", 4, 16.0, 0.0)
    assert b.args == {"r": 8, "alpha": 8.0, "dropout": 0.0, "rslora": False, "init": "default", "loftq_bits": 4,
                      "loftq_iter": 1}  # PEFT defaults
    assert c.exclude and c.pattern == "h.1.*" and not c.adapts


def test_literals_true_false_and_int_to_float():
    r = parse_spec("q:lora(r=2, alpha=3, rslora=true)").rules[0]
    assert r.args["rslora"] is True and isinstance(r.args["alpha"], float)


def test_suffix_glob_matching():
    s = parse_spec("attn.*:lora(r=2)")
    assert s.rules[0].matches("transformer.h.0.attn.c_attn")
    assert not s.rules[0].matches("transformer.h.0.mlp.c_fc")
    layer0 = parse_spec("h.0.*:lora").rules[0]
    assert layer0.matches("transformer.h.0.attn.c_attn")
    assert not layer0.matches("transformer.h.10.attn.c_attn")  # dot-aligned, not substring
    assert not parse_spec("ttn.c_attn:lora").rules[0].matches("h.0.attn.c_attn")


def test_regex_rule_is_full_match():
    r = parse_spec(r"re:.*\.(query|value):lora").rules[0]
    assert r.regex and r.matches("encoder.layer.0.attention.self.query")
    assert not r.matches("encoder.layer.0.attention.self.query.x")


def test_first_rule_wins():
    s = parse_spec("!layer.0.*; attention.*:lora(r=2); *:lora(r=4)")
    assert s.rule_for("encoder.layer.0.attention.self.query")[0] == 0
    assert s.rule_for("encoder.layer.1.attention.self.query")[1].args["r"] == 2
    assert s.rule_for("encoder.layer.1.intermediate.dense")[1].args["r"] == 4


def test_dict_round_trip_and_repr():
    s = parse_spec("attn.*:lora(r=4, rslora=true); !x.*; y:skip")
    s2 = Spec.from_dict(s.to_dict())
    assert s2.rules == s.rules
    assert str(parse_spec(str(s))) == str(s)
    assert "attn.*:lora(" in repr(s)


@pytest.mark.parametrize(
    "spec, fragment, column",
    [
        ("attn.*:lorra(r=8)", "did you mean 'lora'", 7),
        ("attn.*:lora(rank=8)", "did you mean 'r'", 7),
        ("attn.*:lora(r=0)", "r=0 must be > 0", 7),
        ("attn.*:lora(r=2.5)", "must be int", 7),
        ("attn.*:lora(dropout=1.5)", "[0, 1)", 7),
        ("attn.*:lora(r=8", "missing ')'", None),
        ("attn.*:lora(r=8,, a=1)", "cannot parse", None),
        ("attn.*:lora(8)", "must be named", 12),
        ("attn.*:lora(r=x)", "must be a literal", 14),
        ("re:[a:lora", "bad regular expression", 0),
        ("attn.*", "expected PATTERN:METHOD", None),
        ("", "empty spec", None),
        ("  ;  ", "empty spec", None),
    ],
)
def test_errors(spec, fragment, column):
    with pytest.raises(SpecError) as ei:
        parse_spec(spec)
    assert fragment in str(ei.value)
    if column is not None:
        assert ei.value.column == column
        assert "^" in str(ei.value)


def test_caret_points_at_method():
    with pytest.raises(SpecError) as ei:
        parse_spec("a:lora; attn.*:bogus(r=1)")
    lines = str(ei.value).splitlines()
    assert lines[-1].index("^") - 2 == lines[-2].index("bogus") - 2


def test_all_problems_listed_once():
    with pytest.raises(SpecError) as ei:
        parse_spec("a:lora(r=-1, alpha=0, bogus=1)")
    msg = str(ei.value)
    assert "r=-1" in msg and "alpha=0" in msg and "bogus" in msg


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_fuzz_parse_or_spec_error(text):
    try:
        spec = parse_spec(text)
    except SpecError:
        return
    assert isinstance(spec, Spec) and spec.rules


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=":;()=,!*.0123456789 abcdelorqrtu'\"\nre", max_size=40))
def test_fuzz_grammar_alphabet(text):
    try:
        parse_spec(text)
    except SpecError:
        pass
