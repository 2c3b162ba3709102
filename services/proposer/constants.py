"""The UPPER_CASE numeric constants at the top of a train.py: find them, rewrite them in place.

A constant is a module-level `NAME = <number>` assignment (an int or float literal, a
negative one, or a small literal arithmetic such as `2**19`) before the first def or class.
Rewriting replaces only the characters of that value, so comments and alignment stay.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass

from services.contracts import knob_assignments, knob_value

_POW2_TEXT = re.compile(r"2(\s*)\*\*(\s*)\d+")


@dataclass(frozen=True)
class Constant:
    name: str
    value: int | float
    text: str  # the value exactly as written ("0.04", "2**19", "-1")
    line: int  # 1-based line of the value
    start: int  # character offsets of the value within that line
    end: int

    @property
    def is_int(self) -> bool:
        return isinstance(self.value, int)

    @property
    def written_as_pow2(self) -> bool:
        return _POW2_TEXT.fullmatch(self.text) is not None


def _char_offset(line: str, byte_offset: int) -> int:
    """ast column offsets count UTF-8 bytes; string slicing counts characters."""
    return len(line.encode()[:byte_offset].decode(errors="ignore"))


def find_constants(source: str) -> list[Constant]:
    """The numeric UPPER_CASE constants before the first def/class, in source order.

    A name assigned more than once there is ambiguous and left out. SyntaxError if the
    source does not parse.
    """
    tree = ast.parse(source)
    lines = source.splitlines()
    found: dict[str, Constant] = {}
    seen: set[str] = set()
    for target, value in knob_assignments(tree):
        if target.id in seen:
            found.pop(target.id, None)
            continue
        seen.add(target.id)
        number = knob_value(value)
        if number is None or not math.isfinite(number) or value.end_lineno != value.lineno:
            continue
        line = lines[value.lineno - 1]
        start = _char_offset(line, value.col_offset)
        end = _char_offset(line, value.end_col_offset or value.col_offset)
        found[target.id] = Constant(target.id, number, line[start:end], value.lineno, start, end)
    return list(found.values())


def format_value(const: Constant, value: int | float) -> str:
    """`value` written the way `const` was (2**k stays a power expression, ints keep `_`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        match = _POW2_TEXT.fullmatch(const.text)
        if match and value > 0 and value & (value - 1) == 0:
            return f"2{match.group(1)}**{match.group(2)}{value.bit_length() - 1}"
        return f"{value:_}" if "_" in const.text else str(value)
    rounded = float(f"{value:.3g}")
    return repr(rounded)


def rewrite(source: str, changes: dict[str, str], found: list[Constant] | None = None) -> str:
    """`source` with each named constant's value replaced by the given text.

    Names that are not constants of the source are ignored. `found`: the source's
    find_constants(), when the caller has it already.
    """
    found = find_constants(source) if found is None else found
    consts = {c.name: c for c in found if c.name in changes}
    lines = source.splitlines(keepends=True)
    for const in sorted(consts.values(), key=lambda c: (c.line, c.start), reverse=True):
        i = const.line - 1
        lines[i] = lines[i][: const.start] + changes[const.name] + lines[i][const.end :]
    return "".join(lines)
