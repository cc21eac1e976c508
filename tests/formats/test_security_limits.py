"""Work bounded by the grammar, not by luck (issue 19): regex backtracking and shape expressions.

A hang must fail the test: each attack runs in a worker thread joined with a timeout (a thread that
is still running fails the test; no timing asserts). The attacks used to run for minutes or forever.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
from helpers.security import Tiny, fresh_save

import lowrank_compiler as lrc
from lowrank_compiler.cli import main
from lowrank_compiler.safety.regex import paths, pattern_problem, suffix_match
from lowrank_compiler.safety.symexpr import ExprRefused, check_expr

CHAIN = "re:" + ".?" * 32 + "Z"
HANG_S = 60


def _bounded(fn):
    """Run ``fn()`` in a daemon thread; fail if it is still running after HANG_S; return or re-raise."""
    box: dict = {}

    def work():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e
    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(HANG_S)
    assert not t.is_alive(), f"still running after {HANG_S} s: a hang"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def test_optional_chain_refused_by_lrc_inspect_in_bounded_time(tmp_path, capsys):
    saved = fresh_save(tmp_path / "m.lrc")
    capsys.readouterr()
    assert _bounded(lambda: main(["inspect", str(saved), "--spec", CHAIN + ":lora(r=2)"])) == 2
    assert "backtrack" in capsys.readouterr().err  # a SpecError: message, spec, caret


def test_optional_chain_in_peft_alpha_pattern_refused_in_bounded_time(tmp_path):
    torch.manual_seed(0)
    gm = lrc.transform(Tiny(), "fc*:lora(r=2, alpha=4)", example_inputs=(torch.randn(4, 6),))
    lrc.export(gm, tmp_path / "peft", format="peft")
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["alpha_pattern"] = {CHAIN[3:]: 8}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(lrc.LoadError, match="alpha_pattern"):
        _bounded(lambda: lrc.load_peft(Tiny(), tmp_path / "peft", example_inputs=(torch.randn(4, 6),)))


@pytest.mark.parametrize("pattern", [".?" * 32 + "Z", "a{0,30}" * 6 + "Z", "(?:a?b?){9}" * 3 + "Z",
                                     ".*a.*b.*c.*d", "(ab|cd|e)?" * 16 + "Z"])
def test_bounded_repeats_count_too(pattern):
    assert pattern_problem(pattern), pattern


@pytest.mark.parametrize("pattern", [r".*\.(query|value)", "fc[0-9]+", ".*f.*c.*", r"layer\.(0|1|2)\..*",
                                     "(q|k|v)_proj", ".?" * 8 + "Z"])
def test_ordinary_patterns_pass_the_bound(pattern):
    assert pattern_problem(pattern) is None, pattern


def test_bound_matches_counting_by_hand():
    """k optional atoms: 2^k ways; k unbounded single-character repeats on n characters: C(n+k, k)."""
    import math
    from re import _parser

    for k in (4, 12):
        assert paths(_parser.parse(".?" * k + "Z")) == 2 ** k
    assert paths(_parser.parse(".*a.*b.*"), 50) == math.comb(53, 3)
    assert paths(_parser.parse("(ab|cd|ef)"), 50) == 3


def test_peft_suffix_semantics_kept():
    for key, site, want in (("query", "encoder.layer.0.attention.self.query", True),
                            ("self.query", "encoder.layer.0.attention.self.query", True),
                            ("uery", "encoder.layer.0.attention.self.query", False),
                            (r"layer\.0\..*query", "encoder.layer.0.attention.self.query", True)):
        import re

        assert suffix_match(key, site) is want is bool(re.match(rf"(.*\.)?({key})$", site)), key


TOWERS = ["9**9**9", "Pow(2, Mul(64, 64, 64, 64, 64))", "2**64**2", "Pow(Integer(10), Pow(Integer(10), Integer(3)))",
          "-" * 3000 + "1", "(" * 2000 + "1" + ")" * 2000, "s0" + "**s0" * 200, "Pow(s0, 65)",
          "Mul(" * 60 + "1" + ")" * 60, "(((2**64)**64)**64)**64", "Max(2**60, 3)**64", "(2**64 // 1)**64",
          "- - " * 500 + "s0", "s0" + " ** 2" * 100]


@pytest.mark.parametrize("text", TOWERS, ids=[f"tower{i}" for i in range(len(TOWERS))])
def test_shape_expression_towers_and_chains_refused_without_evaluating(text):
    with pytest.raises(ExprRefused):
        _bounded(lambda: check_expr(text))


@pytest.mark.parametrize("text", ["Symbol('s70', positive=True, integer=True)", "Pow(Symbol('s70'), Integer(2))",
                                  "Mul(Integer(64), Symbol('s70', positive=True, integer=True))",
                                  "32*s70 + Mod(s1, 4)", "s0**2", "Min(Integer(32), Mul(Integer(32), s0))",
                                  "2**10*s0"])
def test_shape_expressions_torch_writes_still_pass(text):
    check_expr(text)


def test_expression_refusals_are_expr_refused():
    with pytest.raises(ExprRefused, match="exponent"):
        check_expr("9**9**9")
