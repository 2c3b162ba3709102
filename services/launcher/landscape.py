"""The sim landscape: a synthetic val_bpb over the UPPER_CASE constants of a train.py.

A pure function of a source, so tests and benchmarks know the truth of every variant.
Each numeric module-level constant of the reference (the campaign's seed) gets an optimum
drawn from a fixed seed and the constant's name: in log space for positive values
(optimum = reference x exp(N(0, 0.4))), additively otherwise. The bowl is a positive
definite quadratic in the normalized displacements, with per-constant curvatures and a
few pairwise interactions (so factorial waves pay off), calibrated so the reference scores
REFERENCE_BPB and the optimum OPTIMUM_BPB (the published run went 1.003 -> 0.974).

A run observes true + seeded Gaussian noise; a value far from its optimum fails the way
real runs do at a configurable rate: out of memory when a size-like constant (DEPTH,
batch, width) is far too big, divergence when a learning rate is far too big or another
constant is far off either way; far too small a model or learning rate just trains worse.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.contracts import knob_assignments, knob_value

REFERENCE_BPB = 1.000
OPTIMUM_BPB = 0.970
LOG_SPREAD = 0.4  # std of log(optimum / reference) for positive constants
FAR_LOG = 1.5  # |log(value / optimum)| beyond which a run may fail (~4.5x)
FAR_Z = FAR_LOG / LOG_SPREAD  # the same distance in normalized units
CEILING = 8.0  # a soft cap on the excess over the optimum, so values stay plausible

Failure = Literal["", "oom", "diverged", "crash"]

_SIZE_WORDS = (
    "DEPTH",
    "WIDTH",
    "DIM",
    "BATCH",
    "SEQ",
    "LEN",
    "HEAD",
    "EMBD",
    "EMBED",
    "LAYER",
    "ASPECT",
    "SIZE",
    "HIDDEN",
    "MLP",
    "CONTEXT",
    "TOKENS",
)


def parse_constants(source: str) -> dict[str, float | int]:
    """The knobs: `NAME = <number>` assignments (UPPER_CASE names) at the top of the file,
    before its first def or class (DESIGN §5); SyntaxError if that part does not parse."""
    return dict(_parse_constants(source))


_FIRST_DEF = re.compile(r"^(?:def |class |async def |@)", re.MULTILINE)


@functools.lru_cache(maxsize=512)
def _parse_constants(source: str) -> dict[str, float | int]:
    # Only the top is parsed, and cached: a sim run scores its source several times, and
    # parsing a whole 700-line train.py costs ~20 ms the benchmark would count as overhead.
    first_def = _FIRST_DEF.search(source)
    try:
        tree = ast.parse(source[: first_def.start()] if first_def else source)
    except SyntaxError:
        tree = ast.parse(source)  # the cut fell inside a statement: read it all
    constants: dict[str, float | int] = {}
    for target, value in knob_assignments(tree):
        number = knob_value(value)
        if number is not None and math.isfinite(number):
            constants[target.id] = number
    return constants


def is_seed(name: str) -> bool:
    """A random seed changes the noise of a run, not where the optimum lies."""
    return bool(re.search(r"(^|_)SEED(_|$)", name))


def set_constants(source: str, values: dict[str, float | int]) -> str:
    """The source with the named knobs (as parse_constants reads them) rewritten as literals."""
    lines = source.splitlines(keepends=True)
    # Last first, so that a rewrite never moves the columns of one still to come on its line
    for target, value_node in reversed(list(knob_assignments(ast.parse(source)))):
        if target.id not in values:
            continue
        if value_node.end_lineno != value_node.lineno or value_node.end_col_offset is None:
            continue
        i = value_node.lineno - 1
        line = lines[i]
        start = len(line.encode()[: value_node.col_offset].decode())
        end = len(line.encode()[: value_node.end_col_offset].decode())
        lines[i] = line[:start] + repr(values[target.id]) + line[end:]
    return "".join(lines)


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def is_rate_like(name: str) -> bool:
    return bool(re.search(r"(^|_)(LR|LRS)(_|$)|LEARNING_RATE", name))


def is_size_like(name: str) -> bool:
    return not is_rate_like(name) and any(word in name for word in _SIZE_WORDS)


@dataclass(frozen=True)
class _Axis:
    name: str
    reference: float
    optimum: float
    log_space: bool
    unit: float  # normalized displacement = (x - optimum) / unit, x in log space if log_space
    weight: float

    def coordinate(self, value: float) -> float | None:
        """Normalized displacement from the optimum; None when log space cannot hold it."""
        if self.log_space:
            if value <= 0:
                return None
            return (math.log(value) - math.log(self.optimum)) / self.unit
        return (value - self.optimum) / self.unit


@dataclass(frozen=True)
class SimObservation:
    val_bpb: float | None  # None when the run failed
    failure: Failure
    true_val_bpb: float | None  # None when the source does not parse
    detail: str = ""  # why it failed, in the words a log would use
    culprit: str = ""  # the constant that made it fail


class Landscape:
    """A seeded bowl over the reference source's numeric UPPER_CASE constants."""

    def __init__(self, reference_source: str, seed: int = 0) -> None:
        self.seed = seed
        self.reference = {
            k: v for k, v in parse_constants(reference_source).items() if not is_seed(k)
        }
        self.axes = [self._axis(name, value) for name, value in sorted(self.reference.items())]
        self.pairs = self._interactions()
        ref = self._excess({a.name: a.coordinate(a.reference) or 0.0 for a in self.axes})
        # CEILING * tanh(scale * ref / CEILING) == REFERENCE_BPB - OPTIMUM_BPB at the reference.
        target = CEILING * math.atanh((REFERENCE_BPB - OPTIMUM_BPB) / CEILING)
        self._scale = target / ref if ref > 1e-12 else 0.0

    def _axis(self, name: str, value: float) -> _Axis:
        rng = _rng("landscape", self.seed, name)
        weight = math.exp(rng.gauss(0.0, 0.6))
        if value > 0:
            optimum = value * math.exp(rng.gauss(0.0, LOG_SPREAD))
            return _Axis(name, value, optimum, True, LOG_SPREAD, weight)
        scale = max(abs(value), 0.1)
        return _Axis(name, value, value + rng.gauss(0.0, 1.0) * scale, False, scale, weight)

    def _interactions(self) -> list[tuple[int, int, float]]:
        """A few pairwise terms, shrunk so the quadratic stays positive definite."""
        n = len(self.axes)
        if n < 2:
            return []
        rng = _rng("pairs", self.seed, *(a.name for a in self.axes))
        pairs: list[tuple[int, int, float]] = []
        for _ in range(max(1, n // 3)):
            i, j = rng.sample(range(n), 2)
            rho = rng.uniform(0.3, 0.8) * rng.choice((-1.0, 1.0))
            pairs.append((i, j, rho * math.sqrt(self.axes[i].weight * self.axes[j].weight)))
        # Diagonal dominance of the symmetric matrix (off-diagonals c/2) keeps it PD.
        load = [0.0] * n
        for i, j, c in pairs:
            load[i] += abs(c) / 2
            load[j] += abs(c) / 2
        shrink = min([0.9 * self.axes[k].weight / load[k] for k in range(n) if load[k]] + [1.0])
        return [(i, j, c * shrink) for i, j, c in pairs]

    def _excess(self, z: dict[str, float]) -> float:
        coords = [z[a.name] for a in self.axes]
        total = sum(a.weight * c * c for a, c in zip(self.axes, coords, strict=True))
        total += sum(c * coords[i] * coords[j] for i, j, c in self.pairs)
        return max(total, 0.0)

    def coordinates(self, source: str) -> dict[str, float]:
        """Normalized displacement of each constant (missing ones keep the reference)."""
        values = parse_constants(source)
        z: dict[str, float] = {}
        for axis in self.axes:
            coord = axis.coordinate(values.get(axis.name, axis.reference))
            z[axis.name] = FAR_Z * 4 if coord is None else coord  # <= 0 in log space: far
        return z

    def true_val_bpb(self, source: str) -> float:
        """The noiseless metric of a source; SyntaxError when it does not parse."""
        excess = self._scale * self._excess(self.coordinates(source))
        return OPTIMUM_BPB + CEILING * math.tanh(excess / CEILING)

    def optimum_values(self) -> dict[str, float]:
        return {a.name: a.optimum for a in self.axes}

    def optimum_source(self, source: str) -> str:
        """`source` with every constant at its optimum (exact floats: scores OPTIMUM_BPB)."""
        return set_constants(source, self.optimum_values())

    def far_constant(self, source: str) -> tuple[str, float, Failure] | None:
        """The constant farthest beyond FAR_Z, its coordinate and how it would fail."""
        z = self.coordinates(source)
        for name, coord in sorted(z.items(), key=lambda kv: -abs(kv[1])):
            if abs(coord) <= FAR_Z:
                return None
            # Too small a model or learning rate just trains worse; too big fails.
            if is_size_like(name) and coord > 0:
                return name, coord, "oom"
            if (is_rate_like(name) and coord > 0) or not (is_size_like(name) or is_rate_like(name)):
                return name, coord, "diverged"
        return None

    def observe(self, source: str, key: str, noise: float, failure_rate: float) -> SimObservation:
        """One run's observation: true + N(0, noise) seeded by `key`, or a failure."""
        try:
            truth = self.true_val_bpb(source)
        except SyntaxError as exc:
            return SimObservation(None, "crash", None, f"SyntaxError: {exc.msg}")
        rng = _rng("observe", key)
        far = self.far_constant(source)
        if far is not None and rng.random() < failure_rate:
            name, _coord, kind = far
            optimum = next(a.optimum for a in self.axes if a.name == name)
            detail = f"{name}={parse_constants(source).get(name)} (optimum ~{optimum:.4g})"
            return SimObservation(None, kind, truth, detail, name)
        return SimObservation(truth + rng.gauss(0.0, noise), "", truth)


@functools.lru_cache(maxsize=32)
def _landscape(reference_source: str, seed: int) -> Landscape:
    return Landscape(reference_source, seed)


def default_reference() -> str:
    """The repository's trainer/train.py (read when asked, not at import)."""
    path = Path(__file__).resolve().parents[2] / "trainer" / "train.py"
    if not path.is_file():
        raise FileNotFoundError(f"no default reference source: {path} does not exist")
    return path.read_text()


def true_val_bpb(source: str, reference_source: str | None = None, seed: int = 0) -> float:
    """The sim's truth for `source` (reference: the repo's trainer/train.py by default)."""
    reference = default_reference() if reference_source is None else reference_source
    return _landscape(reference, seed).true_val_bpb(source)
