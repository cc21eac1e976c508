"""The spec language: ``PATTERN:METHOD(ARGS)`` rules → ``Spec``; the first matching rule wins."""

from __future__ import annotations

import ast
import difflib
import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lowrank_compiler.errors import SpecError
from lowrank_compiler.methods.base import FULL, SKIP, get_method
from lowrank_compiler.safety.regex import fullmatch, pattern_problem

_RULE_RE = re.compile(r"^(?P<pat>.*\S)\s*:\s*(?P<meth>[A-Za-z_]\w*)\s*(?:\((?P<args>.*)\))?\s*$", re.S)
_LITERAL_NAMES = {"true": True, "false": False, "none": None, "True": True, "False": False, "None": None}


@dataclass(frozen=True)
class Rule:
    """One rule. ``exclude`` rules (``!PATTERN``) and ``skip`` rules adapt nothing; ``full`` rules make the
    matched module (any module with parameters, found by its path) fully trainable instead of adapting it."""

    pattern: str
    method: str
    args: dict[str, Any] = field(default_factory=dict)
    exclude: bool = False
    regex: bool = False
    column: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if not self.pattern:
            raise SpecError("empty pattern")

    @property
    def adapts(self) -> bool:
        return not self.exclude and self.method not in (SKIP, FULL)

    @property
    def full(self) -> bool:
        """The matched module is trained as a whole (not adapted)."""
        return not self.exclude and self.method == FULL

    def matches(self, name: str) -> bool:
        """Glob over the whole dotted name or any dot-aligned suffix; ``re:`` is a full regex."""
        if self.regex:
            return fullmatch(self.pattern, name)
        parts = name.split(".")
        return any(fnmatch.fnmatchcase(".".join(parts[i:]), self.pattern) for i in range(len(parts)))

    def __str__(self) -> str:
        pat = ("re:" if self.regex else "") + self.pattern
        if self.exclude:
            return "!" + pat
        args = ", ".join(f"{k}={_fmt(v)}" for k, v in self.args.items())
        return f"{pat}:{self.method}({args})" if args else f"{pat}:{self.method}"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


@dataclass(frozen=True)
class Spec:
    """An ordered list of rules. Precedence: the FIRST rule whose pattern matches a site decides it."""

    rules: tuple[Rule, ...]
    text: str = ""

    def rule_for(self, name: str) -> tuple[int, Rule] | None:
        """(index, rule) of the first rule matching ``name``, or None."""
        for i, rule in enumerate(self.rules):
            if rule.matches(name):
                return i, rule
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"rules": [{"pattern": r.pattern, "method": r.method, "args": r.args,
                           "exclude": r.exclude, "regex": r.regex} for r in self.rules]}

    @classmethod
    def parse(cls, text: str) -> Spec:
        """Parse spec text (``"attn.*:lora(r=8); !layer.0.*"``); raises SpecError with column and caret."""
        return parse_spec(text)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Spec:
        """The inverse of :meth:`to_dict`, validated exactly like :func:`parse_spec` (SpecError otherwise)."""
        try:
            rules = tuple(Rule(r["pattern"], r["method"], dict(r.get("args", {})), bool(r.get("exclude", False)),
                               bool(r.get("regex", False))) for r in d["rules"])
        except (KeyError, TypeError, AttributeError) as e:
            raise SpecError(f"a spec dict needs 'rules': [{{'pattern', 'method', 'args'...}}]: {e}") from None
        return parse_spec("; ".join(map(str, rules)))

    @classmethod
    def for_sites(cls, records: Iterable[tuple[str, str, dict[str, Any]]]) -> Spec:
        """One exact-name rule per ``(site, method, args)``: how load and load_peft re-decide saved sites."""
        return parse_spec("; ".join(str(Rule(re.escape(site), method, dict(args), regex=True))
                                    for site, method, args in records))

    def __str__(self) -> str:
        return "; ".join(map(str, self.rules))

    def __repr__(self) -> str:
        return f"Spec({str(self)!r})"


def _split_rules(text: str) -> Iterable[tuple[int, str]]:
    """(start column, rule text) for each top-level rule; `;`/newline inside () or quotes don't split."""
    depth, quote, start = 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SpecError("unbalanced ')'", text, i)
        elif ch in ";\n" and depth == 0:
            yield start, text[start:i]
            start = i + 1
    if quote:
        raise SpecError("unterminated string", text, len(text) - 1)
    if depth > 0:
        raise SpecError("missing ')'", text, len(text) - 1)
    yield start, text[start:]


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Name) and node.id in _LITERAL_NAMES:
        return _LITERAL_NAMES[node.id]
    return ast.literal_eval(node)


def _parse_args(text: str, spec: str, col: int) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        off = getattr(e, "offset", None)
        where = col + max(0, min(len(text) - 1, (off or 3) - 3))
        raise SpecError(f"cannot parse arguments {text.strip()!r}: write name=value, ...", spec, where) from None
    assert isinstance(call, ast.Call)
    if call.args:
        a = call.args[0]
        raise SpecError("arguments must be named (e.g. r=8)", spec, col + a.col_offset - 2)
    out: dict[str, Any] = {}
    for kw in call.keywords:
        kcol = col + kw.col_offset - 2
        if kw.arg is None:
            raise SpecError("'**' is not allowed in a spec", spec, kcol)
        if kw.arg in out:
            raise SpecError(f"argument {kw.arg!r} given twice", spec, kcol)
        try:
            out[kw.arg] = _literal(kw.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            vcol = col + kw.value.col_offset - 2
            raise SpecError(
                f"value of {kw.arg!r} must be a literal (number, string, true/false/none)", spec, vcol
            ) from None
    return out


def parse_spec(text: str) -> Spec:
    """Parse a spec string. Raises SpecError (with column and caret) on any fault."""
    if not isinstance(text, str):
        raise SpecError(f"spec must be a string, got {type(text).__name__}")
    rules: list[Rule] = []
    for start, raw in _split_rules(text):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        col = start + (len(raw) - len(raw.lstrip()))
        if stripped.startswith("!"):
            pat, regex = stripped[1:].strip(), False
            if pat.startswith("re:"):
                pat, regex = pat[3:], True
            if not pat:
                raise SpecError("'!' needs a pattern to exclude", text, col)
            _check_regex(pat, regex, text, col)
            rules.append(Rule(pat, SKIP, {}, exclude=True, regex=regex, column=col))
            continue
        m = _RULE_RE.match(stripped)
        if not m:
            where = col + (stripped.find("(") if "(" in stripped else len(stripped) - 1)
            raise SpecError("expected PATTERN:METHOD(ARGS), e.g. 'attn.*:lora(r=8)'", text, where)
        pat, method = m["pat"], m["meth"]
        regex = pat.startswith("re:")
        if regex:
            pat = pat[3:]
        if not pat.strip():
            raise SpecError("empty pattern before ':'", text, col)
        _check_regex(pat, regex, text, col)
        mcol = col + m.start("meth")
        args = _parse_args(m["args"] or "", text, col + m.start("args")) if m["args"] is not None else {}
        if method in (SKIP, FULL):
            if args:
                raise SpecError(f"'{method}' takes no arguments", text, mcol)
            rules.append(Rule(pat, method, {}, regex=regex, column=col))
            continue
        try:
            cls = get_method(method)
            resolved = cls.resolve_args(args)
        except SpecError as e:
            raise SpecError(e.reason, text, mcol) from None
        rules.append(Rule(pat, method, resolved, regex=regex, column=col))
    if not rules:
        raise SpecError("empty spec: give at least one rule such as 'attn.*:lora(r=8)'")
    return Spec(tuple(rules), text)


def _check_regex(pat: str, regex: bool, text: str, col: int) -> None:
    if regex:
        try:
            re.compile(pat)
        except (re.error, RecursionError, OverflowError) as e:
            raise SpecError(f"bad regular expression {pat!r}: {e}", text, col) from None

        problem = pattern_problem(pat)
        if problem:
            raise SpecError(f"regular expression {pat!r} refused: {problem}", text, col)


def nearby_names(pattern: str, names: list[str], n: int = 5) -> list[str]:
    """A few site names that look like ``pattern`` (for 'matched no site' errors)."""
    key = pattern.replace("*", "").replace("?", "").strip(".")
    suffixes = {}
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            suffixes.setdefault(".".join(parts[i:]), name)
    close = difflib.get_close_matches(key, list(suffixes), n=n, cutoff=0.3)
    out = list(dict.fromkeys(suffixes[c] for c in close))
    return out[:n] or names[:n]
