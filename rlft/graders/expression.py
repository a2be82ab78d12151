"""A small arithmetic language for ``multi`` graders' ``calculate_output`` (OpenAI's grader spec), parsed and
evaluated here without ``eval``:

    numbers, grader names, ( ), + - * / and ^ (power; ** too), unary + and -,
    min(a, b, ...) max(a, b, ...) abs(x) floor(x) ceil(x) exp(x) sqrt(x) log(x)

``compile_expression("0.5 * fuzzy + 0.5 * max(exact, 0)", names)`` checks the text once (syntax, names, functions,
argument counts) and returns an ``Expression``; ``expression.evaluate({"fuzzy": 0.8, "exact": 1.0})`` computes it.
Python's parser only reads the text into a tree; the tree is walked by this module, which knows the nodes listed
above and rejects every other one (attributes, subscripts, lambdas, comprehensions, strings, keyword arguments...),
so no expression reaches Python objects or builtins. Result size is bounded: a power whose result would exceed
``MAX_MAGNITUDE`` is an error, as is any non-finite result.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

MAX_SOURCE_CHARS = 2000
MAX_MAGNITUDE = 1e300

# name -> (function, least arguments, most arguments or None for any)
FUNCTIONS: dict[str, tuple[Callable[..., float], int, int | None]] = {
    "min": (min, 1, None),
    "max": (max, 1, None),
    "abs": (abs, 1, 1),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "exp": (math.exp, 1, 1),
    "sqrt": (math.sqrt, 1, 1),
    "log": (math.log, 1, 1),
}

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class ExpressionError(ValueError):
    """The text is not an expression of this language, or evaluating it failed (with the reason)."""


@dataclass(frozen=True)
class Expression:
    text: str
    tree: ast.expr
    names: frozenset[str]  # the grader names it reads

    def evaluate(self, values: dict[str, float]) -> float:
        result = _evaluate(self.tree, values)
        if not math.isfinite(result):
            raise ExpressionError(f"calculate_output {self.text!r} gave {result} for {values}")
        return float(result)


def compile_expression(text: str, names: set[str] | frozenset[str]) -> Expression:
    """Parse and check ``text``; ``names`` are the variables it may use (the ``multi`` grader's sub-graders)."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("calculate_output must be a non-empty string")
    if len(text) > MAX_SOURCE_CHARS:
        raise ExpressionError(f"calculate_output is {len(text)} characters; at most {MAX_SOURCE_CHARS} allowed")
    try:
        # ``^`` is power here; Python reads it as xor with a lower precedence than + and *, so it is rewritten to
        # ``**`` first (the language has no strings, so no ``^`` can be anything else).
        tree = ast.parse(text.strip().replace("^", "**"), mode="eval").body
    except SyntaxError as exc:
        raise ExpressionError(f"calculate_output {text!r}: syntax error at column {exc.offset}: {exc.msg}") from None
    used: set[str] = set()
    _check(tree, set(names), used, text)
    return Expression(text, tree, frozenset(used))


def _check(node: ast.AST, names: set[str], used: set[str], text: str) -> None:
    def reject(what: str) -> None:
        raise ExpressionError(f"calculate_output {text!r}: {what} is not allowed")

    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            reject(f"the constant {node.value!r}")
    elif isinstance(node, ast.Name):
        if node.id in FUNCTIONS:
            reject(f"the function {node.id!r} without a call")
        if node.id not in names:
            known = ", ".join(sorted(names)) or "none"
            raise ExpressionError(f"calculate_output {text!r}: unknown name {node.id!r} (graders: {known})")
        used.add(node.id)
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            reject(f"the operator {type(node.op).__name__}")
        _check(node.left, names, used, text)
        _check(node.right, names, used, text)
    elif isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY:
            reject(f"the operator {type(node.op).__name__}")
        _check(node.operand, names, used, text)
    elif isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            reject(f"calling {ast.unparse(node.func)!r} (functions: {', '.join(FUNCTIONS)})")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            reject("keyword or starred arguments")
        _, least, most = FUNCTIONS[node.func.id]
        if len(node.args) < least or (most is not None and len(node.args) > most):
            reject(f"{node.func.id}() with {len(node.args)} arguments")
        for arg in node.args:
            _check(arg, names, used, text)
    else:
        reject(f"{type(node).__name__} ({ast.unparse(node)!r})")


def _evaluate(node: ast.expr, values: dict[str, float]) -> float:
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(values[node.id])
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, values))
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left, values), _evaluate(node.right, values)
        op = _BINARY[type(node.op)]
        if op is operator.pow and left != 0 and abs(right) * math.log10(max(abs(left), 1e-300)) > 300:
            raise ExpressionError(f"{left} ^ {right} is too large")
        try:
            result = op(left, right)
        except (ZeroDivisionError, OverflowError) as exc:
            raise ExpressionError(f"{ast.unparse(node)}: {exc}") from None
        if isinstance(result, complex) or abs(result) > MAX_MAGNITUDE:
            raise ExpressionError(f"{ast.unparse(node)} = {result} is out of range")
        return result
    assert isinstance(node, ast.Call)  # everything else was rejected by _check
    fn = FUNCTIONS[node.func.id][0]
    try:
        return float(fn(*[_evaluate(a, values) for a in node.args]))
    except (ValueError, OverflowError) as exc:
        raise ExpressionError(f"{ast.unparse(node)}: {exc}") from None
