"""The grid's refinement phase: a local model of the one-factor results around the best.

Once the screens around the current best are run, each knob has results of moves of
several sizes from the value it still holds (from this parent or an earlier one that had
the same value). Per knob, a parabola in the knob's search coordinate (log space, log(1 - v)
for a beta, the value for a ratio) fitted to those results by least squares, with an
intercept that absorbs the luck of the parents' own runs, gives where that knob's bowl
bottoms out. The refinement proposes those minima (clipped to the range the moves
sampled, so the model never extrapolates): all of them at once, then each alone, then
half-way steps towards each, smaller steps than any screen made.
"""

from __future__ import annotations

import ast
import functools
import math
from dataclasses import dataclass

from services.contracts import knob_value
from services.contracts.knobs import Domain

MIN_POINTS = 4  # a parabola with an intercept needs more points than parameters


@dataclass(frozen=True)
class Sample:
    """One one-factor result: the move's displacement in the search coordinate, and how
    much worse than its parent the run came out (negative: better)."""

    offset: float
    loss: float


@dataclass(frozen=True)
class Minimum:
    """Where a knob's fitted parabola bottoms out."""

    name: str
    offset: float  # from the current value, in the search coordinate
    predicted_gain: float  # how much better than the current value, per the parabola


@functools.lru_cache(maxsize=4096)
def text_value(text: str) -> int | float | None:
    """The number a knob's value text stands for (`0.04`, `2**11`, `1_000`); cached: a
    wave reads the same few hundred values once per result it fits."""
    try:
        return knob_value(ast.parse(text, mode="eval").body)
    except SyntaxError:
        return None


def offset_of(domain: Domain, old: str, new: str) -> float | None:
    """The displacement of a move `old -> new` in the domain's search coordinate."""
    a, b = text_value(old), text_value(new)
    if a is None or b is None or not domain.contains(a) or not domain.contains(b):
        return None
    return domain.warp(b) - domain.warp(a)


def fit_parabola(samples: list[Sample]) -> tuple[float, float, float] | None:
    """(a, b, c) of loss = a d^2 + b d + c by least squares; None when underdetermined."""
    if len(samples) < MIN_POINTS or len({round(s.offset, 9) for s in samples}) < 3:
        return None
    rows = [(s.offset**2, s.offset, 1.0, s.loss) for s in samples]
    normal = [[sum(r[i] * r[j] for r in rows) for j in range(4)] for i in range(3)]
    return _solve3(normal)


def _solve3(m: list[list[float]]) -> tuple[float, float, float] | None:
    """Gaussian elimination with partial pivoting on a 3x4 augmented matrix."""
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-15:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(3):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col], strict=True)]
    return m[0][3] / m[0][0], m[1][3] / m[1][1], m[2][3] / m[2][2]


def minimum_of(name: str, samples: list[Sample]) -> Minimum | None:
    """The knob's fitted minimum within the sampled range; None without a bowl to trust."""
    fit = fit_parabola(samples)
    if fit is None:
        return None
    a, b, _c = fit
    if a <= 0:
        return None  # no curvature upwards: the model does not bottom out here
    low = min(s.offset for s in samples)
    high = max(s.offset for s in samples)
    offset = min(max(-b / (2 * a), low), high)
    gain = -(a * offset * offset + b * offset)
    if gain <= 0 or abs(offset) < 1e-6:
        return None
    return Minimum(name, offset, gain)


def move_to(domain: Domain, current: int | float, offset: float) -> int | float | None:
    """The valid value `offset` away from `current` in the search coordinate; None when it
    rounds back to the current value."""
    target = domain.warp(current) + offset
    value = domain.nearest(domain.unwarp(target))
    if domain.kind == "int" and value == current and abs(offset) > 0.05:
        value = int(current) + (1 if offset > 0 else -1)  # a small int still moves
    if value == current or not domain.contains(value) or not math.isfinite(value):
        return None
    return value
