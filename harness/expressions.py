"""A small, safe expression language for row selection: `--filter`, and the `checks:` ratios and targets.

Suites, checks files and stored runs are shared and committed, so opening one must never run code.
Expressions are therefore parsed with `ast` and checked against a whitelist, then evaluated here
on a DataFrame's columns; no user text ever reaches `DataFrame.query`, `eval`, `exec` or an
attribute lookup. What is allowed (`ALLOWED`):

- column names (`seq_len`, `variant`), numbers, strings, True / False / None;
- comparisons `== != < <= > >=` (chains such as `1024 <= seq_len <= 4096` too), and
  `in` / `not in` a list or tuple of literals (`variant in ['hf_lsh', 'full']`);
- `and`, `or`, `not`, parentheses;
- arithmetic on numbers `+ - * / // % **` and unary `-`/`+`;
- the functions in `FUNCTIONS`: abs, round, min, max (of two values), log2, log10, sqrt.

Everything else (attributes, subscripts, other calls, `@` references, lambdas, comprehensions,
f-strings, walrus, backticks) is rejected with the expression, the offending piece and this list::

    expr = parse_expression("variant == 'lsh' and seq_len <= 4096")
    rows = select_rows(frame, "variant == 'lsh' and seq_len <= 4096")
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pandas is imported lazily: harness.check.rules validates with this module
    import pandas as pd

MAX_LENGTH = 2000  # characters; a selection expression is a line, not a program
MAX_NODES = 500  # syntax-tree nodes
MAX_POWER_EXPONENT = 64  # `10**6` is fine, `10**10**10` is not

FUNCTIONS: dict[str, tuple[int, int]] = {  # name -> (fewest, most) arguments
    "abs": (1, 1),
    "round": (1, 2),  # not a column: the function round()
    "min": (2, 2),
    "max": (2, 2),
    "log2": (1, 1),
    "log10": (1, 1),
    "sqrt": (1, 1),
}

ALLOWED = (
    "column names, numbers, strings, True/False/None; comparisons (== != < <= > >=, chained too) "
    "and `in` / `not in` a [list] of literals; and, or, not, parentheses; arithmetic on numbers "
    f"(+ - * / // % **); the functions {', '.join(FUNCTIONS)}"
)

_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_ARITHMETIC: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_NAMES_OF_NODES = {
    ast.Attribute: "attribute access ('.')",
    ast.Subscript: "subscripts ('[...]' after a value)",
    ast.Lambda: "lambda",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.JoinedStr: "f-strings",
    ast.NamedExpr: "assignment (':=')",
    ast.Starred: "'*' unpacking",
    ast.Dict: "dicts",
    ast.Set: "sets",
    ast.IfExp: "'x if c else y'",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.Slice: "slices",
}


class ExpressionError(ValueError):
    """An expression outside the language, or one that cannot be evaluated on the given rows.
    str is a human message: the expression, what is wrong (and where), and what is allowed."""


@dataclass(frozen=True)
class Expression:
    """A parsed, whitelisted expression. `columns` are the names it reads."""

    text: str
    tree: ast.Expression
    columns: frozenset[str]

    def evaluate(self, frame: pd.DataFrame) -> pd.Series:
        """A boolean Series over `frame`'s index: the rows the expression selects.

        Raises ExpressionError for a column the frame lacks, values the operators cannot take
        (e.g. `variant < 3`), or a result that is not a condition.
        """
        import pandas as pd

        missing = sorted(self.columns - set(map(str, frame.columns)))
        if missing:
            raise self._error(
                f"unknown column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
                f"available columns: {', '.join(map(str, frame.columns))}",
                allowed=False,
            )
        try:
            value = _Evaluator(frame, self.text).visit(self.tree.body)
        except ExpressionError:
            raise
        except (TypeError, ValueError, ArithmeticError) as error:
            raise self._error(f"cannot be evaluated on these rows ({type(error).__name__}: {error})", allowed=False) from None
        if isinstance(value, pd.Series):
            if value.dtype != bool:
                if not value.map(lambda v: isinstance(v, bool)).all():
                    raise self._error("is not a condition (it gives values, not true/false per row)", allowed=False)
                value = value.astype(bool)
            return value
        if isinstance(value, bool):
            return pd.Series(value, index=frame.index, dtype=bool)
        raise self._error(f"is not a condition (it is the constant {value!r})", allowed=False)

    def _error(self, problem: str, allowed: bool = True) -> ExpressionError:
        return ExpressionError(f"expression {self.text!r} {problem}" + (f"; allowed: {ALLOWED}" if allowed else ""))


def parse_expression(text: Any) -> Expression:
    """Parse and whitelist-check `text`; raise ExpressionError naming the offending piece."""
    if not isinstance(text, str):
        raise ExpressionError(f"an expression must be text, got {text!r}")
    if not text.strip():
        raise ExpressionError('empty expression; write a condition such as "seq_len <= 4096"')
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"expression of {len(text)} characters is longer than {MAX_LENGTH}")
    if "@" in text:
        raise ExpressionError(f"expression {text!r}: not allowed: '@' (references to Python variables); allowed: {ALLOWED}")
    if "`" in text:
        raise ExpressionError(f"expression {text!r}: not allowed: backticks; allowed: {ALLOWED}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as error:
        where = f" at column {error.offset}" if error.offset else ""
        raise ExpressionError(f"expression {text!r} is not valid syntax{where} ({error.msg}); allowed: {ALLOWED}") from None
    except (ValueError, RecursionError, MemoryError) as error:
        raise ExpressionError(f"expression {text!r} cannot be parsed ({type(error).__name__}); allowed: {ALLOWED}") from None
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_NODES:
        raise ExpressionError(f"expression {text!r} is too long ({len(nodes)} syntax nodes; at most {MAX_NODES})")
    columns: set[str] = set()
    _check(tree.body, text, columns, top=True)
    return Expression(text, tree, frozenset(columns))


def select_rows(frame: pd.DataFrame, text: str | Expression) -> pd.DataFrame:
    """The rows of `frame` where the expression holds (same columns, original index)."""
    expression = text if isinstance(text, Expression) else parse_expression(text)
    return frame[expression.evaluate(frame)]


def both(first: str, second: str | None) -> str:
    """`(first) and (second)`, or `first` alone when `second` is None: how `at:` narrows a side."""
    return first if second is None else f"({first}) and ({second})"


# --------------------------------------------------------------------------- whitelist


def _piece(node: ast.AST, text: str) -> str:
    segment = ast.get_source_segment(text.strip(), node)
    where = f" at column {node.col_offset + 1}" if hasattr(node, "col_offset") else ""
    return f"{segment!r}{where}" if segment else where.strip()


def _reject(node: ast.AST, text: str, what: str) -> ExpressionError:
    return ExpressionError(f"expression {text!r}: not allowed: {what} ({_piece(node, text)}); allowed: {ALLOWED}")


def _check(node: ast.AST, text: str, columns: set[str], top: bool = False) -> None:
    """Raise ExpressionError at the first node outside the language; collect column names."""
    if (
        top
        and isinstance(node, (ast.Constant, ast.BinOp, ast.List, ast.Tuple))
        and not (isinstance(node, ast.Constant) and isinstance(node.value, bool))
    ):
        raise ExpressionError(
            f'expression {text!r} is not a condition: write a comparison such as "seq_len <= 4096" (got {_piece(node, text)})'
        )
    if isinstance(node, ast.Name):
        columns.add(node.id)
    elif isinstance(node, ast.Constant):
        if not (node.value is None or isinstance(node.value, (bool, int, float, str))):
            raise _reject(node, text, f"a {type(node.value).__name__} literal")
    elif isinstance(node, ast.BoolOp):
        for value in node.values:
            _check(value, text, columns)
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
            raise _reject(node, text, "'~'")
        _check(node.operand, text, columns)
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _ARITHMETIC:
            raise _reject(node, text, f"the operator {type(node.op).__name__} (use and / or / not for conditions)")
        _check(node.left, text, columns)
        _check(node.right, text, columns)
    elif isinstance(node, ast.Compare):
        _check(node.left, text, columns)
        for op, right in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)):
                if not isinstance(right, (ast.List, ast.Tuple)):
                    raise _reject(right, text, "`in` with anything but a [list] of literals")
                for item in right.elts:
                    if not _is_literal(item):
                        raise _reject(item, text, "a list item that is not a literal")
            elif type(op) not in _COMPARE:
                raise _reject(node, text, f"the comparison {type(op).__name__} ('is' / 'is not')")
            else:
                _check(right, text, columns)
    elif isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            raise _reject(node.func, text, "calling anything but the listed functions")
        fewest, most = FUNCTIONS[node.func.id]
        if node.keywords or not fewest <= len(node.args) <= most:
            raise _reject(
                node,
                text,
                f"{node.func.id}() with these arguments (it takes {fewest}"
                f"{'' if fewest == most else f' or {most}'} positional argument{'s' if most > 1 else ''})",
            )
        for argument in node.args:
            _check(argument, text, columns)
    elif isinstance(node, (ast.List, ast.Tuple)):
        raise _reject(node, text, "a list outside `in [...]`")
    else:
        raise _reject(node, text, _NAMES_OF_NODES.get(type(node), type(node).__name__))


def _is_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
        return isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
    return isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (bool, int, float, str)))


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.UnaryOp):
        value = node.operand.value  # type: ignore[attr-defined]
        return -value if isinstance(node.op, ast.USub) else value
    return node.value  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- evaluation


def _is_number(value: Any) -> bool:
    import pandas as pd

    if isinstance(value, pd.Series):
        return pd.api.types.is_numeric_dtype(value.dtype) and not pd.api.types.is_bool_dtype(value.dtype)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Evaluator:
    """Evaluates a checked tree on a frame: Series for column expressions, scalars for constants."""

    def __init__(self, frame: pd.DataFrame, text: str = ""):
        self.frame, self.text = frame, text

    def visit(self, node: ast.AST) -> Any:
        import numpy as np
        import pandas as pd

        if isinstance(node, ast.Name):
            return self.frame[node.id]
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.BoolOp):
            values = [_as_condition(self.visit(v)) for v in node.values]
            result = values[0]
            for value in values[1:]:
                result = (result & value) if isinstance(node.op, ast.And) else (result | value)
            return result
        if isinstance(node, ast.UnaryOp):
            operand = self.visit(node.operand)
            if isinstance(node.op, ast.Not):
                return ~_as_condition(operand) if isinstance(operand, pd.Series) else not _as_condition(operand)
            if not _is_number(operand):
                raise TypeError(f"unary {'-' if isinstance(node.op, ast.USub) else '+'} needs a number")
            return -operand if isinstance(node.op, ast.USub) else +operand
        if isinstance(node, ast.BinOp):
            left, right = self.visit(node.left), self.visit(node.right)
            if not (_is_number(left) and _is_number(right)):
                raise TypeError("arithmetic needs numbers on both sides")
            if isinstance(node.op, ast.Pow):
                if not isinstance(right, pd.Series) and abs(right) > MAX_POWER_EXPONENT:
                    raise ValueError(f"exponent {right!r} is larger than {MAX_POWER_EXPONENT}")
                if not isinstance(left, pd.Series) and not isinstance(right, pd.Series):
                    return float(left) ** float(right)
            result = _ARITHMETIC[type(node.op)](left, right)
            if isinstance(result, pd.Series) and pd.api.types.is_integer_dtype(result):
                # int64 arithmetic wraps silently (2 ** 64 == 0): redo it in float64 to see whether it did
                exact = _ARITHMETIC[type(node.op)](_as_float(left), _as_float(right))
                if (exact.abs() >= 2.0**63).any():
                    raise OverflowError(
                        f"{_piece(node, self.text)} overflows 64-bit integers for some rows; write it with floats (2.0 ** seq_len)"
                    )
            return result
        if isinstance(node, ast.Compare):
            result: Any = True
            left = self.visit(node.left)
            for op, right_node in zip(node.ops, node.comparators):
                if isinstance(op, (ast.In, ast.NotIn)):
                    items = [_literal(item) for item in right_node.elts]  # type: ignore[attr-defined]
                    inside = left.isin(items) if isinstance(left, pd.Series) else left in items
                    step = ~inside if isinstance(op, ast.NotIn) else inside
                    right = left
                else:
                    right = self.visit(right_node)
                    step = _COMPARE[type(op)](left, right)
                result = step if result is True else (result & step)
                left = right
            return result
        if isinstance(node, ast.Call):
            arguments = [self.visit(a) for a in node.args]
            if not all(_is_number(a) for a in arguments):
                raise TypeError(f"{node.func.id}() needs numbers")  # type: ignore[attr-defined]
            name = node.func.id  # type: ignore[attr-defined]
            if name == "round":  # not a column: the function round()
                return np.round(arguments[0], int(arguments[1]) if len(arguments) > 1 else 0)
            if name in ("min", "max"):
                return (np.minimum if name == "min" else np.maximum)(*arguments)
            function = {"abs": np.abs, "log2": np.log2, "log10": np.log10, "sqrt": np.sqrt}[name]
            with np.errstate(all="ignore"):
                value = function(arguments[0])
            return value if isinstance(value, pd.Series) else float(value)
        raise TypeError(f"unexpected {type(node).__name__}")  # _check admits nothing else


def _as_float(value: Any) -> Any:
    """`value` (a Series or a number) as float64."""
    return value.astype("float64") if hasattr(value, "astype") else float(value)


def _as_condition(value: Any) -> Any:
    """A Series of bools (missing values are false) or a bool, for and / or / not."""
    import pandas as pd

    if isinstance(value, pd.Series):
        if value.dtype == bool:
            return value
        if value.map(lambda v: isinstance(v, bool) or v is None).all():
            return value.fillna(False).astype(bool)
        raise TypeError("and / or / not need conditions, not values")
    if isinstance(value, bool):
        return value
    raise TypeError(f"and / or / not need conditions, got {value!r}")
