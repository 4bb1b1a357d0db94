"""Strict reading of JSON documents that arrive from outside (impact assessments, oversight
bundles): bounded size and depth, no NaN / Infinity, no duplicate keys, exact key sets, typed
and bounded values. Every problem is a :class:`~engine.service.status.BadRequest` with the
caller's reason and the path of the offending field (``"protection.measured.eer"``).

Depth is checked on the raw text before :func:`json.loads` runs, so a deeply nested document is
refused without recursing into it.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from .status import BadRequest

HEX64 = re.compile(r"^[0-9a-f]{64}$")


class Reader:
    """Checks one document; ``reason`` is the status reason of every refusal."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def fail(self, path: str, problem: str) -> BadRequest:
        return BadRequest(f"{path or 'document'}: {problem}", reason=self.reason)

    # -- parsing ---------------------------------------------------------------------------------
    def loads(self, data: bytes | str, max_bytes: int, max_depth: int) -> Any:
        """Parse ``data`` (UTF-8 JSON) within ``max_bytes`` and ``max_depth`` nesting levels."""
        if isinstance(data, str):
            data = data.encode()
        if not data:
            raise self.fail("", "empty")
        if len(data) > max_bytes:
            raise self.fail("", f"{len(data)} bytes, more than the {max_bytes} allowed")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("", "not UTF-8 text") from None
        if _depth(text) > max_depth:
            raise self.fail("", f"nested deeper than {max_depth} levels")

        def pairs(items):
            out = {}
            for k, v in items:
                if k in out:
                    raise self.fail(k, "duplicate key")
                out[k] = v
            return out

        def constant(name):
            raise self.fail("", f"{name} is not a number")
        try:
            return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
        except BadRequest:
            raise
        except (ValueError, RecursionError) as exc:   # JSONDecodeError, int too long to convert
            raise self.fail("", f"not valid JSON ({str(exc)[:80]})") from None

    # -- values --------------------------------------------------------------------------------
    def obj(self, v: Any, path: str, required: set[str], optional: set[str] = frozenset()) -> Mapping:
        """A JSON object with exactly the ``required`` keys and any of the ``optional`` ones."""
        if not isinstance(v, dict):
            raise self.fail(path, "must be an object")
        missing = required - set(v)
        if missing:
            raise self.fail(_join(path, sorted(missing)[0]), "is required")
        extra = set(v) - required - optional
        if extra:
            raise self.fail(_join(path, sorted(extra)[0]), "is not a known field")
        return v

    def text(self, v: Any, path: str, max_len: int, required: bool = True, pattern: re.Pattern | None = None) -> str:
        if not isinstance(v, str):
            raise self.fail(path, "must be a string")
        if required and not v.strip():
            raise self.fail(path, "must not be empty")
        if len(v) > max_len:
            raise self.fail(path, f"longer than {max_len} characters")
        if any(ord(c) < 32 and c not in "\n\t" for c in v):
            raise self.fail(path, "contains control characters")
        if pattern is not None and v and not pattern.match(v):
            raise self.fail(path, "has the wrong format")
        return v

    def integer(self, v: Any, path: str, lo: int, hi: int) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(path, "must be an integer")
        if not lo <= v <= hi:
            raise self.fail(path, f"must be in [{lo}, {hi}]")
        return v

    def number(self, v: Any, path: str, lo: float, hi: float) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(path, "must be a finite number")
        if not lo <= v <= hi:
            raise self.fail(path, f"must be in [{lo}, {hi}]")
        return float(v)

    def boolean(self, v: Any, path: str) -> bool:
        if not isinstance(v, bool):
            raise self.fail(path, "must be true or false")
        return v

    def date(self, v: Any, path: str) -> _dt.date:
        s = self.text(v, path, 10)
        try:
            d = _dt.date.fromisoformat(s)
        except ValueError:
            raise self.fail(path, "must be an ISO date (YYYY-MM-DD)") from None
        if len(s) != 10:
            raise self.fail(path, "must be an ISO date (YYYY-MM-DD)")
        return d

    def items(self, v: Any, path: str, max_items: int, min_items: int = 0,
              each: Callable[[Any, str], Any] | None = None) -> list:
        if not isinstance(v, list):
            raise self.fail(path, "must be a list")
        if not min_items <= len(v) <= max_items:
            raise self.fail(path, f"must have {min_items} to {max_items} items, has {len(v)}")
        return [each(x, f"{path}[{i}]") if each else x for i, x in enumerate(v)]


def canonical(doc: Any) -> bytes:
    """The canonical JSON bytes of a document (sorted keys, no spaces, UTF-8): what is hashed."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


def _depth(text: str) -> int:
    """The deepest nesting of objects / arrays in JSON text (brackets inside strings ignored)."""
    depth = deepest = 0
    for c in _BRACKETS.findall(_STRING.sub("", text)):
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest
