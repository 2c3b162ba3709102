"""The grid's steps: which constants it moves, and to which values (each inside the knob's
domain, services.contracts.knobs), level by level from coarse to fine."""

from __future__ import annotations

import math
import re

from services.contracts.knobs import Domain, domain_of, live_knobs
from services.proposer.constants import Constant

COARSE = (0.5, 2.0)
FINE = (0.7, 1.4)
FINER = (0.85, 1.18)  # a large fleet runs out of coarser points around one parent
LEVELS = (COARSE, FINE, FINER)
FINEST = (0.92, 1.09)  # the refinement's smallest steps around the best
# Not hyperparameters: perturbing them only samples noise or breaks the harness.
_SKIP = re.compile(r"SEED|VERBOSE|DEBUG|PRINT|EVERY|CHECKPOINT|FLOPS")
# Additive steps of a ratio (in [0, 1]) per level, the counterpart of the factors.
RATIO_STEPS = (0.2, 0.1, 0.05, 0.025)
_WIDTH_SUFFIXES = ("_DIM", "EMBD", "WIDTH")


def tunable(consts: list[Constant], profile: str = "") -> list[Constant]:
    """Constants worth perturbing: the knobs that take effect on the profile (a `CPU_DEPTH`
    on cpu, its `DEPTH` elsewhere), less seeds and logging switches."""
    live = set(live_knobs([c.name for c in consts], profile))
    return [c for c in consts if c.name in live and not _SKIP.search(c.name)]


def _scaled_int(value: int, factor: float) -> int | None:
    new = max(1, round(value * factor))
    if new == value:
        new = value + 1 if factor > 1 else value - 1
    return new if new >= 1 else None


def step_values(
    const: Constant, head_dim: int | None, factors: tuple[float, ...], level: int
) -> list[int | float]:
    """The new values of one constant for one level of step factors (may be fewer): each
    inside the constant's domain (services.contracts.knobs)."""
    v = const.value
    domain = domain_of(const.name, v)
    if domain.kind == "pow2" or (const.written_as_pow2 and isinstance(v, int)):
        return [] if level else [x for x in (v // 2, v * 2) if domain.contains(x) and x != v]
    out: list[int | float] = []
    for factor in factors:
        new = _one_step(const, domain, factor, head_dim, level)
        if new is not None and new != v and domain.contains(new) and new not in out:
            out.append(new)
    return out


def _one_step(
    const: Constant, domain: Domain, factor: float, head_dim: int | None, level: int
) -> int | float | None:
    v, name = const.value, const.name
    up = factor > 1
    if domain.kind == "ratio":
        step = RATIO_STEPS[min(level, len(RATIO_STEPS) - 1)]
        return float(f"{min(max(v + step if up else v - step, 0.0), 1.0):.3g}")
    if domain.kind == "int" and isinstance(v, int):
        if head_dim and name != "HEAD_DIM" and name.endswith(_WIDTH_SUFFIXES) and v % head_dim == 0:
            return max(head_dim, round(v * factor / head_dim) * head_dim)
        return _scaled_int(v, factor)
    if domain.kind in ("beta", "positive"):
        # In the search coordinate: log(1 - beta) or log(v); a beta stays inside (0, 1).
        return float(f"{domain.unwarp(domain.warp(v) + math.log(factor)):.3g}")
    # Additive steps: zero moves up (most zero constants are rates or ratios); a negative
    # value moves both ways by half its size.
    if v == 0:
        if not up and domain.nonnegative:
            return None
        size: int | float = (2 if level else 1) if isinstance(v, int) else (0.05 if level else 0.1)
    else:
        half = abs(v) / 2 * (0.5 if level else 1.0)
        size = max(1, round(half)) if isinstance(v, int) else float(f"{half:.3g}")
    return v + size if up else v - size
