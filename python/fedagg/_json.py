"""JSON from untrusted peers: size and nesting are bounded before the parser runs.

Deeply nested input would otherwise reach the C parser's recursion (a
RecursionError, or worse where a program raised the interpreter's recursion
limit); so nesting is measured first, in one pass that skips strings.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32


class UntrustedJSONError(ValueError):
    pass


def _depth(text: str) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def loads(data: bytes, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Parse UTF-8 JSON of at most max_bytes and max_depth levels; raises UntrustedJSONError."""
    if len(data) > max_bytes:
        raise UntrustedJSONError(f"{len(data)} bytes of JSON, at most {max_bytes}")
    try:
        text = bytes(data).decode("utf-8")
        # every opening bracket, quoted or not, bounds the depth from above: the character scan
        # runs only for text that could be too deep (a control message has a handful)
        if text.count("[") + text.count("{") > max_depth and _depth(text) > max_depth:
            raise UntrustedJSONError(f"JSON nested deeper than {max_depth} levels")
        return json.loads(text)
    except UntrustedJSONError:
        raise
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, integers beyond the digit limit
        raise UntrustedJSONError(f"{type(e).__name__}: {str(e)[:120]}") from None
