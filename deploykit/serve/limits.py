"""Bounded parsing of untrusted request bodies: nesting depth, integer literal size and tensor dimensions.

Checked before anything is allocated from what the client claims, so hostile input (JSON nested thousands deep,
integer literals of hundreds of digits, dimensions that overflow) is a :class:`LimitError` the protocol layer turns
into a 400, never a recursion error or a huge allocation. Pure functions; no HTTP framework imports.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

MAX_DEPTH = 32  # a KServe v2 request needs ~8 levels (nested data of a 4-D tensor inside inputs[0])
MAX_INT_DIGITS = 20  # int64 has 19 digits; a longer literal is never a valid dimension, size or value
MAX_DIMS = 8
MAX_DIM = 2**31 - 1

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_OPEN, _CLOSE = (ord("["), ord("{")), (ord("]"), ord("}"))


class LimitError(ValueError):
    """The body is over a parsing limit or names impossible dimensions; the message says which and why."""


def nesting_depth(text: bytes) -> int:
    """Deepest ``[``/``{`` nesting in a JSON text, brackets inside strings ignored (a linear scan, no recursion)."""
    a = np.frombuffer(_STRING.sub(b'""', text), dtype=np.uint8)
    opening = (a == _OPEN[0]) | (a == _OPEN[1])
    where = np.flatnonzero(opening | (a == _CLOSE[0]) | (a == _CLOSE[1]))
    if where.size == 0:
        return 0
    steps = np.where(opening[where], 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max())


def _bounded_int(literal: str) -> int:
    digits = len(literal.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise LimitError(f"an integer literal of {digits} digits is over the limit of {MAX_INT_DIGITS}; send "
                         "dimensions, sizes and values that fit in 64 bits")
    return int(literal)


def _no_constant(name: str) -> Any:
    raise LimitError(f"{name} is not JSON (RFC 8259); send finite numbers")


def loads_bounded(text: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` with nesting depth, integer literal length and NaN/Infinity constants bounded.

    Raises:
        LimitError: over a limit (message says which).
        json.JSONDecodeError, UnicodeDecodeError: not JSON.
    """
    raw = text.encode() if isinstance(text, str) else text
    # the depth can't exceed the number of opening brackets: most requests are refused the scan's cost
    depth = 0 if raw.count(b"[") + raw.count(b"{") <= max_depth else nesting_depth(raw)
    if depth > max_depth:
        raise LimitError(f"JSON nested {depth} levels deep is over the limit of {max_depth}; a KServe v2 infer "
                         "request needs fewer than 10 (send 'data' flat, row-major)")
    try:
        return json.loads(raw, parse_int=_bounded_int, parse_constant=_no_constant)
    except RecursionError as e:  # belt and braces: the scan above should have refused it
        raise LimitError("JSON is nested too deeply") from e


def check_shape(shape: Any, what: str = "input 'shape'") -> list[int]:
    """A tensor shape: a list of at most ``MAX_DIMS`` integers in ``[0, MAX_DIM]`` (``true`` is not an integer)."""
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise LimitError(f"{what} must be a list of at most {MAX_DIMS} non-negative integers, found "
                         f"{_short(shape)}")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= MAX_DIM:
            raise LimitError(f"{what} must be a list of non-negative integers (at most {MAX_DIM}), found "
                             f"{_short(shape)}")
    return list(shape)


def check_count(shape: list[int], limit: int, unit: str) -> int:
    """Element count of ``shape`` (exact integer product), refused when over ``limit`` (what the body can hold)."""
    count = math.prod(shape)
    if count > limit:
        raise LimitError(f"shape {shape} needs {count} {unit}, more than the request body can hold ({limit}); "
                         "the shape must describe the data actually sent")
    return count


def _short(v: Any, n: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."
