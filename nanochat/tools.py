"""
The calculator tool of the Engine: a tiny arithmetic evaluator on Python's ast, never eval(). What a model writes
between <|python_start|> and <|python_end|> is evaluated here, bounded in size and time.
"""

import ast
import operator
import re
import time
import warnings

_BINARY_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPR_CHARS = 1000  # longer "expressions" are not arithmetic a model writes in one tool call
MAX_EXPONENT = 1000  # bounds the cost of a single **
MAX_INT_BITS = 4096  # ~1200 decimal digits: keeps every intermediate (and str(result)) cheap
# a thousands separator: a comma between a digit and exactly three digits ("1,234,567"); "(1,2)" is a tuple, refused
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class _Refused(Exception):
    pass


def _eval_node(node, deadline):
    # The deadline is checked at every node, so the limit holds on any thread (signals only work on the main one).
    if time.monotonic() > deadline:
        raise _Refused("time limit")
    if isinstance(node, ast.Expression):
        return _eval_node(node.body, deadline)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _check_size(_UNARY_OPS[type(node.op)](_number(node.operand, deadline)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _number(node.left, deadline), _number(node.right, deadline)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise _Refused("exponent too large")
        return _check_size(_BINARY_OPS[type(node.op)](left, right))
    # the one method allowed: "strawberry".count("r") (letter counting is a classic small-model tool call)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and _is_str(node.func.value) and len(node.args) == 1 and _is_str(node.args[0]) and not node.keywords):
        return node.func.value.value.count(node.args[0].value)
    raise _Refused(f"{type(node).__name__} is not allowed")


def _is_str(node):
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _number(node, deadline):
    value = _eval_node(node, deadline)
    if type(value) not in (int, float):
        raise _Refused("not a number")
    return value


def _check_size(value):
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _Refused("number too large")
    if isinstance(value, complex):  # e.g. (-8) ** 0.5
        raise _Refused("complex result")
    return value


def use_calculator(expr, max_time=1.0):
    """Evaluate an arithmetic expression: numbers, + - * / // % ** (bounded), unary +/-, parentheses, and
    "string".count("s"). Returns the value, or None when the expression is refused, fails or takes too long."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return None
    if "'" not in expr and '"' not in expr:
        expr = THOUSANDS.sub("", expr)  # thousands separators: "1,234 * 2"
    deadline = time.monotonic() + max_time
    try:
        with warnings.catch_warnings():  # e.g. "invalid decimal literal" for 3x: a refusal, not a warning to print
            warnings.simplefilter("ignore")
            tree = ast.parse(expr.strip(), mode="eval")
        return _eval_node(tree, deadline)
    except (_Refused, SyntaxError, ArithmeticError, ValueError, TypeError, RecursionError, MemoryError):
        return None
