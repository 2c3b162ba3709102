"""The grid's screens: points that move several knobs at once, in a random order.

A 2x2 (or 2x2x2) screen combines steps of one level. A fleet wider than every other
candidate (a thousand slots or more) draws wider screens of the finer levels next, and
last an endless supply of random points around the parent: 2 to 4 knobs, each at a step
of any level, so that a fleet of any width always has something new to run (a random
search in the best's neighbourhood) instead of idling once the grid's lists run out.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator

from services.proposer.constants import Constant, format_value
from services.proposer.moves import Move
from services.proposer.steps import FINEST, LEVELS, step_values

MAX_RANDOM_KNOBS = 4  # a random point moves 2 to 4 knobs at once
ALL_LEVELS = (*LEVELS, FINEST)

Usable = Callable[[Move], bool]  # a move that neither failed nor lost may be combined


def head_dim(consts: list[Constant]) -> int | None:
    return next(
        (c.value for c in consts if c.name == "HEAD_DIM" and isinstance(c.value, int)), None
    )


def _moves(const: Constant, head: int | None, level: int) -> list[Move]:
    factors = ALL_LEVELS[level]
    return [
        Move(const.name, const.text, format_value(const, v))
        for v in step_values(const, head, factors, level)
    ]


def screen(
    consts: list[Constant], usable: Usable, rng: random.Random, level: int = 0, size: int = 2
) -> list[tuple[Move, ...]]:
    """Screening points (steps of `size` constants at once, at the steps of `level`: coarse
    by default), the last resort once the one-factor neighbourhood and the refinement are
    used up: a move that failed or lost is not combined again."""
    head = head_dim(consts)
    singles = [move for c in consts for move in _moves(c, head, level) if usable(move)]
    points = [
        tuple(sorted(group, key=lambda m: m.name))
        for group in itertools.combinations(singles, size)
        if len({m.name for m in group}) == size
    ]
    rng.shuffle(points)
    return points


def wide_screens(
    consts: list[Constant], usable: Usable, rng: random.Random
) -> list[tuple[Move, ...]]:
    """For a fleet larger than every other candidate (a first wave of 1,000 slots or more):
    2x2 screens of the next finer steps, then 2x2x2 screens of the coarse ones, then of
    the finer ones, then both of the finest one-factor steps."""
    return [
        *screen(consts, usable, rng, level=1),
        *screen(consts, usable, rng, size=3),
        *screen(consts, usable, rng, level=1, size=3),
        *screen(consts, usable, rng, level=2),
        *screen(consts, usable, rng, level=2, size=3),
    ]


def random_points(
    consts: list[Constant], usable: Usable, rng: random.Random, draws: int
) -> Iterator[tuple[Move, ...]]:
    """Up to `draws` random points: 2 to 4 knobs, each moved by a step of a random level
    (coarse to finest). Points repeat now and then; the caller skips the ones it knows."""
    head = head_dim(consts)
    choices = {
        c.name: [m for level in range(len(ALL_LEVELS)) for m in _moves(c, head, level) if usable(m)]
        for c in consts
    }
    names = sorted(name for name, moves in choices.items() if moves)
    if len(names) < 2:
        return
    for _ in range(draws):
        picked = rng.sample(names, rng.randint(2, min(MAX_RANDOM_KNOBS, len(names))))
        yield tuple(sorted((rng.choice(choices[n]) for n in picked), key=lambda m: m.name))
