"""The grid's screens: points that move several knobs at once, in a random order.

A 2x2 (or 2x2x2) screen combines steps of one level. A fleet wider than every other
candidate (a thousand slots or more) draws wider screens of the finer levels next, and
last an endless supply of random points around the parent: 2 to 4 knobs, each at a step
of any level or by a random factor in [x0.5, x2], so that a fleet of any width always has
something new to run (a random search in the best's neighbourhood) instead of idling once
the grid's lists run out.
"""

from __future__ import annotations

import itertools
import math
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


def _random_move(
    const: Constant, head: int | None, steps: list[Move], usable: Usable, rng: random.Random
) -> Move | None:
    """One knob's move of a random point: half the time one of its steps, else a step by a
    random factor in [x0.5, x2] (a value no list holds), so the points never run out."""
    if steps and rng.random() < 0.5:
        return rng.choice(steps)
    factor = math.exp(rng.uniform(-math.log(2), math.log(2)))
    values = step_values(const, head, (factor,), rng.randrange(len(ALL_LEVELS)))
    if not values:
        return rng.choice(steps) if steps else None
    move = Move(const.name, const.text, format_value(const, rng.choice(values)))
    return move if usable(move) else None


def random_points(
    consts: list[Constant], usable: Usable, rng: random.Random, draws: int
) -> Iterator[tuple[Move, ...]]:
    """Up to `draws` random points: 2 to 4 knobs, each moved by a step of a random level
    or by a random factor. Points repeat now and then; the caller skips the ones it knows."""
    if len(consts) < 2:
        return
    head = head_dim(consts)
    by_name = {c.name: c for c in consts}
    steps = {
        c.name: [m for level in range(len(ALL_LEVELS)) for m in _moves(c, head, level) if usable(m)]
        for c in consts
    }
    names = sorted(by_name)
    for _ in range(draws):
        picked = rng.sample(names, rng.randint(2, min(MAX_RANDOM_KNOBS, len(names))))
        moves = [_random_move(by_name[n], head, steps[n], usable, rng) for n in picked]
        found = [m for m in moves if m is not None]
        if len(found) >= 2:
            yield tuple(sorted(found, key=lambda m: m.name))
