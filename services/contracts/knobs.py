"""Which knobs take effect, and the values a trainer accepts for each (DESIGN §5).

A knob's domain follows from its name and the value the reference (seed) gives it:

- `beta`: a BETA or MOMENTUM in (0, 1), searched in log(1 - v), so a step never reaches 0 or 1;
- `ratio`: a RATIO, FRAC or DROPOUT in [0, 1], searched additively and clamped;
- `pow2`: an integer power of two named like a batch, head dimension, sequence or vocabulary
  (or written `2**k`), searched in log2;
- `int`: any other positive integer (a depth, an aspect ratio), searched in log space, >= 1;
- `positive`: a positive float (a learning rate, a weight decay), searched in log space;
- `real`: anything else (zero or negative), searched additively; >= 0 for rates and ratios.

Across knobs the reference trainer asserts one rule: the tokens of one optimizer step
(TOTAL_BATCH_SIZE) are a whole number of forward passes (DEVICE_BATCH_SIZE rows of the
profile's sequence length), per profile prefix (`CPU_TOTAL_BATCH_SIZE` with
`CPU_DEVICE_BATCH_SIZE`). A value outside these domains is one no trainer run accepts:
the grid never proposes it and the sim crashes a run that has it, as the trainer does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

Kind = Literal["beta", "ratio", "pow2", "int", "positive", "real"]
Number = int | float

# trainer/prepare.py's PROFILES max_seq_len (tests/test_knob_domains.py checks they agree).
SEQ_LEN_BY_PROFILE: dict[str, int] = {"gpu": 2048, "cpu": 256}

_POW2_WORDS = ("BATCH", "HEAD_DIM", "SEQ_LEN", "VOCAB")
_RATIO_WORDS = ("RATIO", "FRAC", "DROPOUT")
_BETA_WORDS = ("BETA", "MOMENTUM")
_NONNEGATIVE_WORDS = (*_RATIO_WORDS, "DECAY", "LR", "WARMUP", "SMOOTH")
_TOTAL, _DEVICE = "TOTAL_BATCH_SIZE", "DEVICE_BATCH_SIZE"


def live_knobs(names: Iterable[str], profile: str = "") -> list[str]:
    """The knobs that take effect on `profile`, in the given order.

    A profile override pair (`CPU_DEPTH` beside `DEPTH`) keeps only the live one: the
    prefixed knob on its profile, the plain one elsewhere. Without a profile both stay.
    """
    names = list(names)
    present = set(names)
    prefix = f"{profile.upper()}_" if profile else ""
    out = []
    for name in names:
        head, _, rest = name.partition("_")
        if profile and rest in present and f"{head}_" != prefix:
            continue  # another profile's override
        if prefix and f"{prefix}{name}" in present:
            continue  # overridden on this profile
        out.append(name)
    return out


def _is_pow2(value: Number) -> bool:
    return isinstance(value, int) and value >= 1 and value & (value - 1) == 0


@dataclass(frozen=True)
class Domain:
    """The values one knob may take, and the coordinate it is searched in."""

    name: str
    kind: Kind
    nonnegative: bool = False  # `real` only: a rate or ratio that cannot go below zero

    @property
    def is_int(self) -> bool:
        return self.kind in ("pow2", "int")

    @property
    def log_space(self) -> bool:
        return self.kind not in ("ratio", "real")

    def contains(self, value: Number) -> bool:
        if not math.isfinite(value):
            return False
        if self.is_int and not isinstance(value, int):
            return False
        match self.kind:
            case "beta":
                return 0 < value < 1
            case "ratio":
                return 0 <= value <= 1
            case "pow2":
                return _is_pow2(value) and value >= (2 if self.name.endswith("HEAD_DIM") else 1)
            case "int":
                return value >= 1
            case "positive":
                return value > 0
            case _:
                return value >= 0 or not self.nonnegative

    def warp(self, value: float) -> float:
        """The search coordinate of a value in the domain (log space, log(1 - v), or v)."""
        if self.kind == "beta":
            return math.log(1 - value)
        return math.log(value) if self.log_space else value

    def unwarp(self, coord: float) -> float:
        """The value at a search coordinate (a float: `nearest` makes it a valid value)."""
        if self.kind == "beta":
            return 1 - math.exp(coord)
        return math.exp(coord) if self.log_space else coord

    def nearest(self, value: float) -> Number:
        """The valid value closest to `value` in the search coordinate (3 significant digits
        for a float, as a proposal writes it)."""
        match self.kind:
            case "pow2":
                low = 2 if self.name.endswith("HEAD_DIM") else 1
                return max(low, 1 << max(0, round(math.log2(max(value, 1e-300)))))
            case "int":
                return max(1, round(value))
            case "beta":
                return min(max(float(f"{value:.3g}"), 0.001), 0.999)
            case "ratio":
                return min(max(float(f"{value:.3g}"), 0.0), 1.0)
            case "positive":
                return max(float(f"{value:.3g}"), 1e-12)
            case _:
                rounded = float(f"{value:.3g}")
                return max(rounded, 0.0) if self.nonnegative else rounded


def domain_of(name: str, reference: Number) -> Domain:
    """The domain of knob `name` whose reference value is `reference`."""
    if any(w in name for w in _BETA_WORDS) and 0 < reference < 1:
        return Domain(name, "beta")
    if any(w in name for w in _RATIO_WORDS) and 0 <= reference <= 1:
        return Domain(name, "ratio")
    if isinstance(reference, int) and reference >= 1:
        if _is_pow2(reference) and any(w in name for w in _POW2_WORDS):
            return Domain(name, "pow2")
        return Domain(name, "int")
    if reference > 0:
        return Domain(name, "positive")
    return Domain(name, "real", any(w in name for w in _NONNEGATIVE_WORDS))


def domains_of(reference: Mapping[str, Number]) -> dict[str, Domain]:
    return {name: domain_of(name, value) for name, value in reference.items()}


def batch_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """(total, device) knob name pairs that share a profile prefix."""
    present = set(names)
    return [
        (name, name[: -len(_TOTAL)] + _DEVICE)
        for name in sorted(present)
        if name.endswith(_TOTAL) and name[: -len(_TOTAL)] + _DEVICE in present
    ]


def invalid_reason(
    values: Mapping[str, Number], domains: Mapping[str, Domain], profile: str = ""
) -> str | None:
    """Why a trainer would reject these knob values (what it asserts); None when valid.

    `values` holds every knob of the source (those without a domain are not checked).
    """
    for name, value in values.items():
        domain = domains.get(name)
        if domain is not None and not domain.contains(value):
            return f"{name} = {value!r} is outside its domain ({domain.kind})"
    seq_len = SEQ_LEN_BY_PROFILE.get(profile, 1)
    for total, device in batch_pairs(values):
        rows = values[device] * seq_len
        if rows > 0 and values[total] % rows != 0:
            return (
                f"{total} = {values[total]!r} is not a multiple of {device} x sequence length "
                f"({values[device]!r} x {seq_len}): the trainer asserts "
                "TOTAL_BATCH_SIZE % (rows x seq len) == 0"
            )
    return None


_SEED = re.compile(r"(^|_)SEED(_|$)")


def is_seed(name: str) -> bool:
    """A random seed changes the noise of a run, not where the optimum lies."""
    return bool(_SEED.search(name))
