"""A strict grammar for the symbolic shape expressions inside a torch.export archive.

torch's deserializer hands each ``expr_str`` to ``sympy.sympify``, which evaluates Python. Before
any of that runs, :func:`check_expr` parses the string with this module's own recursive-descent
parser and refuses anything that is not an arithmetic/comparison expression over shape symbols
(``s0``, ``u3`` ...), integer literals and a fixed list of sympy/torch function names. Nothing here
evaluates the text; it only accepts or rejects it.

Every power needs a literal exponent of at most 64 in magnitude, every symbol-free intermediate is
bounded by :data:`MAX_BITS` bits (tracked as an upper bound, never computed), and nesting by
:data:`MAX_DEPTH`: ``9**9**9``, ``Pow(2, Mul(64, 64, 64))`` and long ``-``/``**`` chains are refused.

Accepted forms (what torch 2.x writes): ``srepr`` style ``Mul(Integer(32), Symbol('s70',
positive=True, integer=True))`` and infix style ``32*s70 + Mod(s1, 4)``, ``s0 // 2``, ``s0 <= 64``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

MAX_LEN = 4096
MAX_DEPTH = 48
MAX_INT_DIGITS = 24
MAX_POW_EXPONENT = 64
MAX_BITS = 4096  # bound on any symbol-free intermediate value sympy would compute

#: function names sympify may see (sympy core + torch.utils._sympy.functions, as in torch's deserializer)
FUNCTIONS = frozenset("""
Symbol Integer Rational Float Add Mul Pow Mod Max Min Abs Eq Ne Lt Le Gt Ge And Or Not
StrictLessThan LessThan StrictGreaterThan GreaterThan Equality Unequality
FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift
PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat
TruncToInt RoundToInt RoundDecimal ToFloat Identity BitwiseFn_bitwise_and BitwiseFn_bitwise_or
OpaqueUnaryFn_sqrt OpaqueUnaryFn_exp OpaqueUnaryFn_log Piecewise ExprCondPair
""".split())
_POW = frozenset({"Pow", "PowByNatural", "FloatPow"})
#: keyword arguments allowed in a call (sympy assumptions; ``precision`` of Float)
KEYWORDS = frozenset({"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
                      "commutative", "zero", "nonzero", "precision"})
CONSTANTS = frozenset({"True", "False", "oo", "true", "false"})
SYMBOL = re.compile(r"[a-z]{1,4}\d{1,9}\Z")  # s0, u12, zuf3, ...
_NUMBER_TEXT = re.compile(r"-?\d{1,24}(\.\d{1,24})?([eE][-+]?\d{1,3})?\Z")

_TOKEN = re.compile(r"""\s*(?:
    (?P<num>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?) |
    (?P<name>[A-Za-z_][A-Za-z0-9_]*) |
    (?P<str>'[^'\\]{0,64}') |
    (?P<op>//|\*\*|<=|>=|==|!=|[-+*/%<>(),=])
)""", re.X)


class ExprRefused(ValueError):
    """The string is not an expression this grammar accepts (the message says why)."""


def _tokenize(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ExprRefused(f"unexpected character {text[pos:pos + 10].strip()[:1]!r} at offset {pos}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]):
        self.toks, self.i = tokens, 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value):
            raise ExprRefused(f"expected {value or 'more input'!r}, got {tok[1] if tok else 'end of text'!r}")
        self.i += 1
        return tok

    # Each rule returns a _Val: ``lit`` is the exact value of a plain number (Integer(n), -n) or None;
    # ``bits`` bounds log2 of the value sympy would compute for a symbol-free subexpression (None when
    # it holds a symbol, so sympy keeps it symbolic). Powers need a known exponent |e| <= 64 and a
    # symbol-free result of at most MAX_BITS bits: no tower, however nested, is ever evaluated.
    def expr(self, depth: int) -> _Val:
        if depth > MAX_DEPTH:
            raise ExprRefused(f"nested deeper than {MAX_DEPTH}")
        left = self.arith(depth)
        tok = self.peek()
        if tok and tok[1] in ("<", "<=", ">", ">=", "==", "!="):
            self.take()
            right = self.arith(depth)
            return _Val(None, _join(left, right, 1))
        return left

    def arith(self, depth: int) -> _Val:
        v = self.term(depth)
        while (tok := self.peek()) and tok[1] in ("+", "-"):
            self.take()
            v = _Val(None, _join(v, self.term(depth), 1))
        return v

    def term(self, depth: int) -> _Val:
        v = self.unary(depth)
        while (tok := self.peek()) and tok[1] in ("*", "/", "//", "%"):
            op = self.take()[1]
            right = self.unary(depth)
            v = _Val(None, _join(v, right, 0, add=op in ("*", "/")))
        return v

    def unary(self, depth: int) -> _Val:
        if depth > MAX_DEPTH:
            raise ExprRefused(f"nested deeper than {MAX_DEPTH}")
        if (tok := self.peek()) and tok[1] == "-":
            self.take()
            v = self.unary(depth + 1)
            return _Val(-v.lit if v.lit is not None else None, v.bits)
        base = self.atom(depth)
        if (tok := self.peek()) and tok[1] == "**":
            self.take()
            return _power(base, self.unary(depth + 1))
        return base

    def atom(self, depth: int) -> _Val:
        kind, text = self.take()
        if kind == "num":
            if len(text) > MAX_INT_DIGITS:
                raise ExprRefused(f"number {text[:12]}... is longer than {MAX_INT_DIGITS} digits")
            value = float(text) if not text.isdigit() else int(text)
            if not abs(value) < 1e30:
                raise ExprRefused(f"number {text[:12]} is too large")
            return _Val(value, max(int(abs(value)).bit_length(), 1))
        if kind == "op" and text == "(":
            v = self.expr(depth + 1)
            self.take(")")
            return v
        if kind == "name":
            if (tok := self.peek()) and tok[1] == "(":
                return self.call(text, depth + 1)
            if text in CONSTANTS or SYMBOL.match(text):
                return _Val(None, None if SYMBOL.match(text) or text == "oo" else 1)
            raise ExprRefused(f"unknown name {text!r} (only shape symbols like s0 and known functions)")
        raise ExprRefused(f"unexpected {text!r}")

    def call(self, fn: str, depth: int) -> _Val:
        if fn not in FUNCTIONS:
            raise ExprRefused(f"function {fn!r} is not an allowed shape function")
        if depth > MAX_DEPTH:
            raise ExprRefused(f"nested deeper than {MAX_DEPTH}")
        self.take("(")
        args: list[_Val] = []
        while (tok := self.peek()) and tok[1] != ")":
            kind, text = tok
            nxt = self.toks[self.i + 1] if self.i + 1 < len(self.toks) else None
            if kind == "name" and nxt and nxt[1] == "=":
                if text not in KEYWORDS:
                    raise ExprRefused(f"keyword {text!r} is not allowed")
                self.i += 2
                k, v = self.take()
                if not (v in ("True", "False") or k == "num" and v.isdigit() and len(v) <= 4):
                    raise ExprRefused(f"keyword {text}= takes True/False or a small integer, got {v!r}")
            elif kind == "str":
                self.take()
                inner = text[1:-1]
                if not (SYMBOL.match(inner) or _NUMBER_TEXT.match(inner)):
                    raise ExprRefused(f"string {text!r} is neither a shape symbol nor a number")
                args.append(_Val(None, None if SYMBOL.match(inner) else 80))
            else:
                args.append(self.expr(depth + 1))
            if (tok := self.peek()) and tok[1] == ",":
                self.take()
            elif not tok or tok[1] != ")":
                raise ExprRefused(f"expected ',' or ')' in {fn}(...)")
        self.take(")")
        if fn in _POW:
            if len(args) != 2:
                raise ExprRefused(f"{fn} takes two arguments")
            return _power(args[0], args[1])
        if fn == "Integer" and len(args) == 1:
            return args[0]
        bits: int | None = 1
        for a in args:  # a sum or product of its arguments bounds every other function's value
            bits = None if bits is None or a.bits is None else bits + a.bits + 1
        if bits is not None and bits > MAX_BITS:
            raise ExprRefused(f"{fn}(...) of numbers would exceed {MAX_BITS} bits")
        return _Val(None, bits)


class _Val(NamedTuple):
    lit: float | None  # exact value of a plain number
    bits: int | None  # bound on log2 |value| when symbol-free; None when it holds a symbol


def _join(a: _Val, b: _Val, extra: int, add: bool = False) -> int | None:
    """Bits of a binary op's result: max(+1) for +, -, //, %, comparisons; the sum for * and /."""
    if a.bits is None or b.bits is None:
        return None
    bits = a.bits + b.bits if add else max(a.bits, b.bits) + extra
    if bits > MAX_BITS:
        raise ExprRefused(f"an intermediate value would exceed {MAX_BITS} bits")
    return bits


def _power(base: _Val, exp: _Val) -> _Val:
    """A power is accepted only with a known exponent |e| <= 64 and a bounded symbol-free result."""
    if exp.lit is None:
        raise ExprRefused("power with a computed or symbolic exponent (only a number up to "
                          f"{MAX_POW_EXPONENT} is accepted)")
    if abs(exp.lit) > MAX_POW_EXPONENT:
        raise ExprRefused(f"power with exponent {exp.lit} (at most {MAX_POW_EXPONENT})")
    if base.bits is None:
        return _Val(None, None)
    bits = base.bits * max(int(abs(exp.lit)) + 1, 1)
    if bits > MAX_BITS:
        raise ExprRefused(f"a power of numbers would exceed {MAX_BITS} bits")
    return _Val(None, bits)


def check_expr(text: object) -> None:
    """Raise :class:`ExprRefused` unless ``text`` is a shape expression of the accepted grammar."""
    if not isinstance(text, str):
        raise ExprRefused(f"expected a string, got {type(text).__name__}")
    if len(text) > MAX_LEN:
        raise ExprRefused(f"longer than {MAX_LEN} characters")
    tokens = _tokenize(text)
    if not tokens:
        raise ExprRefused("empty expression")
    p = _Parser(tokens)
    p.expr(0)
    if p.peek() is not None:
        raise ExprRefused(f"unexpected {p.peek()[1]!r} after a complete expression")
