"""JSON parsed with limits, for every file and every text a user or another program hands us.

Python's ``json`` takes ``NaN``, ``Infinity`` and integers of any length, and recurses once per
nesting level: a spec holding ``Infinity`` or ``10**400`` turns into overflowing arithmetic later,
and a 100,000-deep list ends in a ``RecursionError``. `loads` refuses all three with a named error
that says which file or option and why, before anything reads the value.
"""

from __future__ import annotations

import json
import math
from typing import Any

from core.errors import DefectPruneError

MAX_DEPTH = 64
MAX_INT_DIGITS = 20  # beyond 64 bits nothing in DefectPrune is a count or a seed


class InvalidJSONError(DefectPruneError):
    """Text that is not JSON, or JSON beyond the limits (depth, non-finite or huge numbers)."""


class JSONLimitError(InvalidJSONError):
    """Well-formed JSON beyond the limits (as opposed to text that is not JSON at all)."""


def _depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings (a cheap scan, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (only finite numbers are)")


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"the integer {text[:12]}... has {len(text)} digits, more than {MAX_INT_DIGITS}")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:24]} is too large to be finite")
    return value


def loads(text: str | bytes, source: str, error: type[DefectPruneError] = InvalidJSONError) -> Any:
    """``json.loads`` with the limits; ``source`` names the file or option in the message and
    ``error`` is the type raised (a caller's own, e.g. a checkpoint error)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{source} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    # a limit is the caller's error and a JSONLimitError; the default error (or any parent of
    # JSONLimitError) is JSONLimitError itself (a subclass of both would have no valid MRO)
    if issubclass(error, JSONLimitError) or issubclass(JSONLimitError, error):
        limit_error = error if issubclass(error, JSONLimitError) else JSONLimitError
    else:
        limit_error = type(f"{error.__name__}Limit", (error, JSONLimitError), {})
    if _depth(text) > MAX_DEPTH:
        raise limit_error(f"{source} nests deeper than {MAX_DEPTH} levels; it is not a file DefectPrune wrote")
    try:
        return json.loads(text, parse_constant=_constant, parse_int=_integer, parse_float=_float)
    except json.JSONDecodeError as exc:
        raise error(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:
        raise limit_error(f"{source} is not usable JSON ({exc})") from None


def read(path: Any, source: str | None = None, error: type[DefectPruneError] = InvalidJSONError) -> Any:
    """`loads` of a file's text."""
    try:
        data = open(path, "rb").read()
    except OSError as exc:
        raise error(f"{source or path} cannot be read ({exc.strerror})") from None
    return loads(data, source or str(path), error)
