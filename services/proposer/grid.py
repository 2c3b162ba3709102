"""The grid strategy: no LLM, perturbs the UPPER_CASE numeric constants of the parent.

Every wave is planned from the request alone (deterministic, restart-safe):

1. Factorial combinations of winners: one-factor moves that beat their own parent by more
   than the noise floor and still apply to the current parent (its constant still holds the
   value the move started from). The top three give a 2x2 or 2x2x2 design; the points not
   yet run (AB, AC, BC, ABC, or a winner transplanted onto a new parent) come first.
2. One-factor moves around the current parent (the best so far, so the grid re-centres on
   every new best): coarse steps (x0.5, x2 in log space for positive values; additive for
   zero and negative ones), then finer ones (x0.7, x1.4, then x0.85, x1.18). Moves never
   tried from any parent come before moves that were tried and were neutral, and losers
   come last.
3. For a fleet larger than that neighbourhood: a 2x2 screen over pairs of constants.

A move is written in the title as `NAME old -> new` (joined by ` + ` for combinations),
which is also how later waves read the results back.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from dataclasses import dataclass

from services.contracts import variant_id_for
from services.proposer.constants import Constant, find_constants, format_value, rewrite
from services.proposer.strategy import Proposal, ProposalRequest, ResultRow, StrategyExhausted

COARSE = (0.5, 2.0)
FINE = (0.7, 1.4)
FINER = (0.85, 1.18)  # a large fleet runs out of coarser points around one parent
LEVELS = (COARSE, FINE, FINER)
MAX_FACTORS = 3  # 2x2x2 at most

# Not hyperparameters: perturbing them only samples noise or breaks the harness.
_SKIP = re.compile(r"SEED|VERBOSE|DEBUG|PRINT|EVERY|CHECKPOINT|FLOPS")
_POW2_WORDS = ("BATCH", "HEAD_DIM", "SEQ_LEN", "VOCAB")
_FRACTION_WORDS = ("RATIO", "FRAC", "DROPOUT")
_BETA_WORDS = ("BETA", "MOMENTUM")
_NONNEGATIVE_WORDS = (*_FRACTION_WORDS, "DECAY", "LR", "WARMUP", "SMOOTH")
_WIDTH_SUFFIXES = ("_DIM", "EMBD", "WIDTH")
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


def parse_title(title: str) -> tuple[Move, ...] | None:
    """The moves a grid title names; None for a title the grid did not write."""
    moves = []
    for part in title.split(" + "):
        match = _MOVE.fullmatch(part)
        if match is None:
            return None
        moves.append(Move(*match.groups()))
    return tuple(moves)


def gain(direction: str, base: float, value: float) -> float:
    """How much better `value` is than `base` (positive: better)."""
    return value - base if direction == "maximize" else base - value


# --- which constants, which values ---------------------------------------------------


def tunable(consts: list[Constant], profile: str = "") -> list[Constant]:
    """Constants worth perturbing.

    A profile override pair (`CPU_DEPTH` beside `DEPTH`) keeps only the live one: the
    prefixed constant on its profile, the plain one elsewhere.
    """
    names = {c.name for c in consts}
    prefix = f"{profile.upper()}_" if profile else ""
    out = []
    for const in consts:
        if _SKIP.search(const.name):
            continue
        head, _, rest = const.name.partition("_")
        is_override = bool(rest) and rest in names
        if is_override and profile and f"{head}_" != prefix:
            continue
        if prefix and f"{prefix}{const.name}" in names:
            continue
        out.append(const)
    return out


def _is_pow2(value: int) -> bool:
    return value >= 2 and value & (value - 1) == 0


def _scaled_int(value: int, factor: float) -> int | None:
    new = max(1, round(value * factor))
    if new == value:
        new = value + 1 if factor > 1 else value - 1
    return new if new >= 1 else None


def step_values(
    const: Constant, head_dim: int | None, factors: tuple[float, ...], fine: bool
) -> list[int | float]:
    """The new values of one constant for one set of step factors (may be fewer)."""
    v, name = const.value, const.name
    out: list[int | float] = []
    if (
        isinstance(v, int)
        and (const.written_as_pow2 or any(w in name for w in _POW2_WORDS))
        and _is_pow2(v)
    ):
        return [] if fine else [v // 2, v * 2]
    for factor in factors:
        new = _one_step(const, factor, head_dim, fine)
        if new is None or new == v:
            continue
        if any(w in name for w in _FRACTION_WORDS) and 0 <= v <= 1 and not 0 <= new <= 1:
            continue
        out.append(new)
    return out


def _one_step(
    const: Constant, factor: float, head_dim: int | None, fine: bool
) -> int | float | None:
    v, name = const.value, const.name
    if v > 0:
        if isinstance(v, int):
            if (
                head_dim
                and name != "HEAD_DIM"
                and name.endswith(_WIDTH_SUFFIXES)
                and v % head_dim == 0
            ):
                return max(head_dim, round(v * factor / head_dim) * head_dim)
            return _scaled_int(v, factor)
        if any(w in name for w in _BETA_WORDS) and v < 1:
            return float(f"{1 - (1 - v) * factor:.3g}")
        return float(f"{v * factor:.3g}")
    # Additive steps: zero moves up (most zero constants are rates or ratios); a negative
    # value moves both ways by half its size.
    up = factor > 1
    if v == 0:
        if not up and any(w in name for w in _NONNEGATIVE_WORDS):
            return None
        size = (2 if fine else 1) if isinstance(v, int) else (0.05 if fine else 0.1)
    else:
        half = abs(v) / 2 * (0.5 if fine else 1.0)
        size = max(1, round(half)) if isinstance(v, int) else float(f"{half:.3g}")
    return v + size if up else v - size


# --- planning ----------------------------------------------------------------------


@dataclass
class _Outcomes:
    """What the results say about each move: its best gain over its own parent."""

    gains: dict[Move, float]
    winners: list[tuple[float, Move, str | None]]  # (gain, move, parent_id)


def _outcomes(request: ProposalRequest) -> _Outcomes:
    by_id: dict[str, ResultRow] = {row.variant_id: row for row in request.results}
    parent_value = {rid: row.value for rid, row in by_id.items() if row.value is not None}
    if request.best_value is not None:
        parent_value.setdefault(request.parent_id, request.best_value)
    gains: dict[Move, float] = {}
    winners: list[tuple[float, Move, str | None]] = []
    for row in request.results:
        moves = parse_title(row.title)
        if not moves or len(moves) != 1 or row.status == "infra":
            continue
        base = parent_value.get(row.parent_id or "")
        if row.status != "ok" or row.value is None:
            g = float("-inf")
        elif base is None:
            continue
        else:
            g = gain(request.direction, base, row.value)
        gains[moves[0]] = max(g, gains.get(moves[0], float("-inf")))
        if g > request.noise_floor:
            winners.append((g, moves[0], row.parent_id))
    return _Outcomes(gains, winners)


def _combinations(
    consts: dict[str, Constant], outcomes: _Outcomes, parent_id: str
) -> list[tuple[Move, ...]]:
    """Factorial points of the best applicable winners, the most promising first.

    A single winner is a point of its own only when it won on another parent (it is then
    transplanted onto this one); on this parent it has run already.
    """
    best: dict[str, tuple[float, Move, str | None]] = {}
    for g, move, won_on in outcomes.winners:
        const = consts.get(move.name)
        if const is None or const.text != move.old:
            continue  # the parent moved on from the value this move started at
        if move.name not in best or g > best[move.name][0]:
            best[move.name] = (g, move, won_on)
    top = sorted(best.values(), key=lambda w: (-w[0], w[1].name))[:MAX_FACTORS]
    subsets = [
        combo
        for size in range(len(top), 0, -1)
        for combo in itertools.combinations(top, size)
        if size > 1 or combo[0][2] != parent_id
    ]
    subsets.sort(key=lambda combo: -sum(w[0] for w in combo))
    return [tuple(sorted((w[1] for w in combo), key=lambda m: m.name)) for combo in subsets]


def _one_factor(
    consts: list[Constant], outcomes: _Outcomes, busy: set[Move], rng: random.Random
) -> list[tuple[Move, ...]]:
    """Single moves around the parent: untried coarse, untried fine, neutral, losers."""
    head = next(
        (c.value for c in consts if c.name == "HEAD_DIM" and isinstance(c.value, int)), None
    )
    order = list(consts)
    rng.shuffle(order)
    # Untried moves level by level, then neutral ones, then losers.
    tiers: list[list[tuple[Move, ...]]] = [[] for _ in range(len(LEVELS) + 2)]
    for level, factors in enumerate(LEVELS):
        for const in order:
            for value in step_values(const, head, factors, level > 0):
                move = Move(const.name, const.text, format_value(const, value))
                tried = outcomes.gains.get(move)
                if tried is None and move not in busy:
                    tier = level
                else:
                    tier = len(LEVELS) + (1 if tried is not None and tried < 0 else 0)
                tiers[tier].append((move,))
    return [moves for tier in tiers for moves in tier]


def _pairwise(consts: list[Constant], rng: random.Random) -> list[tuple[Move, ...]]:
    """Two-factor screening points (coarse steps of two constants at once).

    A large fleet exhausts the one-factor neighbourhood of one parent in a wave or two;
    a 2x2 screen over every pair of constants keeps it busy with points that also measure
    interactions, until a new best re-centres the grid.
    """
    head = next(
        (c.value for c in consts if c.name == "HEAD_DIM" and isinstance(c.value, int)), None
    )
    singles = [
        Move(c.name, c.text, format_value(c, v))
        for c in consts
        for v in step_values(c, head, COARSE, False)
    ]
    pairs = [
        tuple(sorted((a, b), key=lambda m: m.name))
        for i, a in enumerate(singles)
        for b in singles[i + 1 :]
        if a.name != b.name
    ]
    rng.shuffle(pairs)
    return pairs


def _rationale(
    moves: tuple[Move, ...], kind: str, request: ProposalRequest, outcomes: _Outcomes
) -> str:
    where = f"the current best ({request.parent_id}"
    where += f", {request.metric} {request.best_value:.6f})" if request.best_value else ")"
    if kind == "screen":
        return f"two-factor screening point around {where}: " + " and ".join(m.label for m in moves)
    if kind == "combination":
        won = {m: g for g, m, _ in outcomes.winners}
        parts = ", ".join(f"{m.label} (better by {won.get(m, 0.0):.4g})" for m in moves)
        return (
            f"factorial combination on {where} of moves that each beat their parent by "
            f"more than the noise floor {request.noise_floor:.2g}: {parts}"
        )
    move = moves[0]
    return f"one-factor step of {move.name} from {move.old} to {move.new} around {where}"


class GridStrategy:
    """Constant perturbations; deterministic given the request."""

    name = "grid"

    def __init__(self, profile: str = "") -> None:
        self.profile = profile

    async def propose(self, request: ProposalRequest) -> list[Proposal]:
        return self.plan(request)

    def plan(self, request: ProposalRequest) -> list[Proposal]:
        try:
            found = find_constants(request.parent_source)
            consts = tunable(found, self.profile)
        except SyntaxError as exc:
            raise StrategyExhausted(
                f"the parent {request.parent_id} does not parse ({exc.msg}, line {exc.lineno}); "
                "the grid has no constants to perturb"
            ) from exc
        outcomes = _outcomes(request)
        busy = {m for title in request.in_flight_titles for m in parse_title(title) or ()}
        seed = hashlib.sha256(f"{request.campaign}\0{request.parent_id}".encode()).digest()
        rng = random.Random(int.from_bytes(seed[:8], "big"))
        combos = _combinations({c.name: c for c in consts}, outcomes, request.parent_id)
        candidates = [(m, "combination") for m in combos]
        candidates += [(m, "single") for m in _one_factor(consts, outcomes, busy, rng)]
        candidates += [(m, "screen") for m in _pairwise(consts, rng)]
        known = set(request.known_ids)
        proposals: list[Proposal] = []
        for moves, kind in candidates:
            if len(proposals) >= request.k:
                break
            source = rewrite(request.parent_source, {m.name: m.new for m in moves}, found)
            variant_id = variant_id_for(request.campaign, source)
            if source == request.parent_source or variant_id in known:
                continue
            known.add(variant_id)
            proposals.append(
                Proposal(
                    title=title_of(moves),
                    source=source,
                    parent_id=request.parent_id,
                    rationale=_rationale(moves, kind, request, outcomes),
                )
            )
        if not proposals and not request.in_flight_titles and request.k > 0:
            raise StrategyExhausted(
                f"every grid point around {request.parent_id} has been tried "
                f"({len(consts)} constants, steps down to x0.85/x1.18, factorial combinations); "
                "start a campaign with the claude strategy to go further"
            )
        return proposals
