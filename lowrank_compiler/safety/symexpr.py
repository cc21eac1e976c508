"""A strict grammar for the symbolic shape expressions inside a torch.export archive.

torch's deserializer hands each ``expr_str`` to ``sympy.sympify``, which evaluates Python. Before
any of that runs, :func:`check_expr` parses the string with this module's own recursive-descent
parser and refuses anything that is not an arithmetic/comparison expression over shape symbols
(``s0``, ``u3`` ...), integer literals and a fixed list of sympy/torch function names. Nothing here
evaluates the text; it only accepts or rejects it.

Accepted forms (what torch 2.x writes): ``srepr`` style ``Mul(Integer(32), Symbol('s70',
positive=True, integer=True))`` and infix style ``32*s70 + Mod(s1, 4)``, ``s0 // 2``, ``s0 <= 64``.
"""

from __future__ import annotations

import re

MAX_LEN = 4096
MAX_DEPTH = 48
MAX_INT_DIGITS = 24
MAX_POW_EXPONENT = 64

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

    # expr := arith (cmp arith)?  -- returns an int literal value or None (non-literal)
    def expr(self, depth: int) -> int | None:
        if depth > MAX_DEPTH:
            raise ExprRefused(f"nested deeper than {MAX_DEPTH}")
        left = self.arith(depth)
        tok = self.peek()
        if tok and tok[1] in ("<", "<=", ">", ">=", "==", "!="):
            self.take()
            self.arith(depth)
            return None
        return left

    def arith(self, depth: int) -> int | None:
        v = self.term(depth)
        while (tok := self.peek()) and tok[1] in ("+", "-"):
            self.take()
            self.term(depth)
            v = None
        return v

    def term(self, depth: int) -> int | None:
        v = self.unary(depth)
        while (tok := self.peek()) and tok[1] in ("*", "/", "//", "%"):
            self.take()
            self.unary(depth)
            v = None
        return v

    def unary(self, depth: int) -> int | None:
        if (tok := self.peek()) and tok[1] == "-":
            self.take()
            v = self.unary(depth + 1)
            return -v if v is not None else None
        base = self.atom(depth)
        if (tok := self.peek()) and tok[1] == "**":
            self.take()
            exp = self.unary(depth + 1)
            _check_exponent(exp)
            return None
        return base

    def atom(self, depth: int) -> int | None:
        kind, text = self.take()
        if kind == "num":
            if len(text) > MAX_INT_DIGITS:
                raise ExprRefused(f"number {text[:12]}... is longer than {MAX_INT_DIGITS} digits")
            return int(text) if text.isdigit() else None
        if kind == "op" and text == "(":
            v = self.expr(depth + 1)
            self.take(")")
            return v
        if kind == "name":
            if (tok := self.peek()) and tok[1] == "(":
                return self.call(text, depth + 1)
            if text in CONSTANTS or SYMBOL.match(text):
                return None
            raise ExprRefused(f"unknown name {text!r} (only shape symbols like s0 and known functions)")
        raise ExprRefused(f"unexpected {text!r}")

    def call(self, fn: str, depth: int) -> int | None:
        if fn not in FUNCTIONS:
            raise ExprRefused(f"function {fn!r} is not an allowed shape function")
        self.take("(")
        args: list[int | None] = []
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
                args.append(None)
            else:
                args.append(self.expr(depth + 1))
            if (tok := self.peek()) and tok[1] == ",":
                self.take()
            elif not tok or tok[1] != ")":
                raise ExprRefused(f"expected ',' or ')' in {fn}(...)")
        self.take(")")
        if fn in _POW and len(args) >= 2:
            _check_exponent(args[1])
        if fn == "Integer" and len(args) == 1:
            return args[0]
        return None


def _check_exponent(exp: int | None) -> None:
    if exp is not None and abs(exp) > MAX_POW_EXPONENT:
        raise ExprRefused(f"power with exponent {exp} (at most {MAX_POW_EXPONENT})")


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
