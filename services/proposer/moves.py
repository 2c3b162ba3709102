"""A grid move (one knob from one value's text to another) and the titles that name them:
`NAME old -> new`, joined by ` + ` for combinations, which is also how later waves read the
results back."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

_MOVE = re.compile(r"([A-Z][A-Z0-9_]*) (\S+) -> (\S+)")


@dataclass(frozen=True)
class Move:
    name: str
    old: str  # the value's text in the source the move starts from
    new: str

    @property
    def label(self) -> str:
        return f"{self.name} {self.old} -> {self.new}"


def title_of(moves: tuple[Move, ...]) -> str:
    return " + ".join(m.label for m in moves)


@functools.lru_cache(maxsize=65536)
def parse_title(title: str) -> tuple[Move, ...] | None:
    """The moves a grid title names; None for a title the grid did not write (cached: every
    wave reads the titles of every result and of every variant in flight)."""
    moves = []
    for part in title.split(" + "):
        match = _MOVE.fullmatch(part)
        if match is None:
            return None
        moves.append(Move(*match.groups()))
    return tuple(moves)
