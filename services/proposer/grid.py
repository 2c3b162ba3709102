"""The grid strategy: no LLM, perturbs the UPPER_CASE numeric constants of the parent,
each inside its domain (services.contracts.knobs; the steps are in steps.py).

Every wave is planned from the request alone (deterministic, restart-safe):

1. Factorial combinations of winners: one-factor moves that beat their own parent by more
   than the noise floor (of their mean: over n replicates, the floor / sqrt(n)) and still apply to the current parent (its constant still holds the
   value the move started from). The top three give a 2x2 or 2x2x2 design; the points not
   yet run (AB, AC, BC, ABC, or a winner transplanted onto a new parent) come first.
2. One-factor moves around the current parent (the best so far, so the grid re-centres on
   every new best), never tried from any parent: coarse steps (x0.5, x2 in the knob's
   search coordinate), then finer ones (x0.7, x1.4, then x0.85, x1.18).
3. Refinement (refine.py): each knob's fitted minimum (all at once, each alone, half-way),
   then steps of x0.92 / x1.09 around the parent.
4. The top candidates: moves tried before that came out within the noise of their parent,
   re-run on the current parent (the best first), then the other neutral ones.
5. Last: a 2x2 screen over pairs of coarse moves that neither failed nor lost, then losers.
6. Only for a fleet wider than that whole list (a thousand slots or more: the variants in
   flight and asked for outnumber every candidate above), after all of it:
   2x2 screens of the next finer steps, then 2x2x2 screens of coarse moves, then random
   points (2 to 4 knobs, each at a step of any level or by a random factor; screens.py),
   so such a fleet never idles for want of a candidate.

Every candidate is checked against the knobs' domains and the trainer's batch rule on the
profile; a move that failed is never combined again. A move is written in the title as
`NAME old -> new` (joined by ` + ` for combinations), which is also how later waves read
the results back.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from dataclasses import dataclass, field

from services.contracts import variant_id_for
from services.contracts.knobs import Domain, domain_of, invalid_reason
from services.proposer.constants import Constant, find_constants, format_value, rewrite
from services.proposer.moves import Move, parse_title, title_of
from services.proposer.refine import Minimum, Sample, minimum_of, move_to, offset_of, text_value
from services.proposer.screens import head_dim, random_points, screen, wide_screens
from services.proposer.steps import FINEST, LEVELS, step_values, tunable
from services.proposer.strategy import Proposal, ProposalRequest, StrategyExhausted

MAX_FACTORS = 3  # 2x2x2 at most
RERUN_TOP = 3  # the top candidates (tried, within the noise) re-run on a new best

WIDE_FLEET = 256  # variants in flight and asked for, beyond which wider screens may be drawn
RANDOM_DRAWS_PER_PROPOSAL = 20  # random points drawn per variant asked for, at most
ID_CACHE = 100_000  # candidates remembered (some 40 MB at most)


def gain(direction: str, base: float, value: float) -> float:
    """How much better `value` is than `base` (positive: better)."""
    return value - base if direction == "maximize" else base - value


# --- planning ----------------------------------------------------------------------


@dataclass
class _Outcomes:
    """What the results say about each move: its best gain over its own parent, the
    one-factor samples per knob (for the refinement's model), and the moves that failed."""

    gains: dict[Move, float]
    winners: list[tuple[float, Move, str | None]]  # (gain, move, parent_id)
    samples: dict[tuple[str, str], list[Sample]]  # (name, old text) -> samples
    failed: set[Move]

    def usable(self, move: Move) -> bool:
        """A move that neither failed nor lost, which a screen may combine."""
        return move not in self.failed and self.gains.get(move, 0.0) >= 0


def _outcomes(request: ProposalRequest, domains: dict[str, Domain]) -> _Outcomes:
    parent_value = {row.variant_id: row.value for row in request.results if row.value is not None}
    if request.best_value is not None:
        parent_value.setdefault(request.parent_id, request.best_value)
    out = _Outcomes({}, [], {}, set())
    for row in request.results:
        moves = parse_title(row.title)
        if not moves or row.status == "infra":
            continue
        if row.status != "ok" or row.value is None:
            if len(moves) == 1:
                out.failed.add(moves[0])
                out.gains[moves[0]] = max(float("-inf"), out.gains.get(moves[0], float("-inf")))
            continue
        base = parent_value.get(row.parent_id or "")
        if base is None or len(moves) != 1:
            continue
        move, g = moves[0], gain(request.direction, base, row.value)
        out.gains[move] = max(g, out.gains.get(move, float("-inf")))
        if g > request.noise_floor / math.sqrt(row.runs):  # a mean of n runs: sigma / sqrt(n)
            out.winners.append((g, move, row.parent_id))
        domain = domains.get(move.name)
        offset = offset_of(domain, move.old, move.new) if domain else None
        if offset is not None:
            out.samples.setdefault((move.name, move.old), []).append(Sample(offset, -g))
    return out


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
        if const is None or const.text != move.old or move in outcomes.failed:
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
) -> tuple[list[tuple[Move, ...]], list[tuple[Move, ...]], list[tuple[Move, ...]]]:
    """Single moves around the parent: (untried level by level, neutral ones, losers)."""
    head = head_dim(consts)
    order = list(consts)
    rng.shuffle(order)
    untried: list[tuple[Move, ...]] = []
    neutral: list[tuple[float, tuple[Move, ...]]] = []
    losers: list[tuple[Move, ...]] = []
    for level, factors in enumerate(LEVELS):
        for const in order:
            for value in step_values(const, head, factors, level):
                move = Move(const.name, const.text, format_value(const, value))
                tried = outcomes.gains.get(move)
                if tried is None and move not in busy:
                    untried.append((move,))
                elif tried is not None and (tried < 0 or move in outcomes.failed):
                    losers.append((move,))
                else:
                    neutral.append((-(tried or 0.0), (move,)))
    neutral.sort(key=lambda gm: gm[0])  # the top candidates first
    return untried, [m for _, m in neutral], losers


def _refinements(
    consts: list[Constant], outcomes: _Outcomes, domains: dict[str, Domain]
) -> list[tuple[Move, ...]]:
    """The refinement phase: the fitted minima of the knobs (all at once, each alone,
    half-way towards each), then steps smaller than the screens' around the parent."""
    minima: list[tuple[Minimum, Constant]] = []
    for const in consts:
        found = minimum_of(const.name, outcomes.samples.get((const.name, const.text), []))
        if found is not None:
            minima.append((found, const))
    minima.sort(key=lambda mc: -mc[0].predicted_gain)
    full: list[Move] = []
    half: list[Move] = []
    for minimum, const in minima:
        domain = domains[const.name]
        for fraction, into in ((1.0, full), (0.5, half)):
            value = move_to(domain, const.value, minimum.offset * fraction)
            if value is not None:
                into.append(Move(const.name, const.text, format_value(const, value)))
    out: list[tuple[Move, ...]] = []
    if len(full) > 1:
        out.append(tuple(sorted(full, key=lambda m: m.name)))
    out += [(m,) for m in full] + [(m,) for m in half]
    if len(full) > 2:
        out += [
            tuple(sorted(pair, key=lambda m: m.name))
            for pair in itertools.combinations(full[:4], 2)
        ]
    head = head_dim(consts)
    for const in consts:
        for value in step_values(const, head, FINEST, len(LEVELS)):
            out.append((Move(const.name, const.text, format_value(const, value)),))
    return out


def _rationale(
    moves: tuple[Move, ...], kind: str, request: ProposalRequest, outcomes: _Outcomes
) -> str:
    where = f"the current best ({request.parent_id}"
    where += f", {request.metric} {request.best_value:.6f})" if request.best_value else ")"
    labels = " and ".join(m.label for m in moves)
    if kind == "screen":
        return f"{len(moves)}-factor screening point around {where}: {labels}"
    if kind == "random":
        return f"random point around {where}, the grid's lists being used up: {labels}"
    if kind == "refine":
        return (
            f"refinement around {where}: {labels}, towards where the parabola fitted to the "
            "one-factor results of each knob bottoms out, or a step smaller than the screens'"
        )
    if kind == "rerun":
        return f"a top candidate re-run on {where}: {labels} (within the noise of its parent)"
    if kind == "combination":
        won = {m: g for g, m, _ in outcomes.winners}
        parts = ", ".join(f"{m.label} (better by {won.get(m, 0.0):.4g})" for m in moves)
        return (
            f"factorial combination on {where} of moves that each beat their parent by "
            f"more than the noise floor {request.noise_floor:.2g}: {parts}"
        )
    move = moves[0]
    return f"one-factor step of {move.name} from {move.old} to {move.new} around {where}"


def _rejected(
    moves: tuple[Move, ...],
    values: dict[str, int | float],
    domains: dict[str, Domain],
    profile: str,
) -> bool:
    """Whether the parent with these moves holds a value no trainer accepts."""
    changed = dict(values)
    for move in moves:
        value = text_value(move.new)
        if value is None:
            return True
        changed[move.name] = value
    return invalid_reason(changed, domains, profile) is not None


def _candidates(
    request: ProposalRequest, consts: list[Constant], domains: dict[str, Domain]
) -> tuple[list[tuple[tuple[Move, ...], str]], _Outcomes, random.Random]:
    """Every candidate in the order the grid proposes them, with its kind (and the random
    order's generator, for the wide screens drawn after them when a fleet needs more)."""
    outcomes = _outcomes(request, domains)
    busy = {m for title in request.in_flight_titles for m in parse_title(title) or ()}
    seed = hashlib.sha256(f"{request.campaign}\0{request.parent_id}".encode()).digest()
    rng = random.Random(int.from_bytes(seed[:8], "big"))
    untried, neutral, losers = _one_factor(consts, outcomes, busy, rng)
    ordered = [
        (_combinations({c.name: c for c in consts}, outcomes, request.parent_id), "combination"),
        (untried, "single"),
        (_refinements(consts, outcomes, domains), "refine"),
        (neutral[:RERUN_TOP], "rerun"),
        (neutral[RERUN_TOP:], "single"),
        (screen(consts, outcomes.usable, rng), "screen"),
        (losers, "single"),
    ]
    return [(moves, kind) for group, kind in ordered for moves in group], outcomes, rng


@dataclass
class _Wave:
    """One plan in the making: what it reads, and the proposals so far."""

    request: ProposalRequest
    found: list[Constant]
    values: dict[str, int | float]
    domains: dict[str, Domain]
    outcomes: _Outcomes
    known: set[str]
    proposals: list[Proposal] = field(default_factory=list)


class GridStrategy:
    """Constant perturbations; deterministic given the request."""

    name = "grid"

    def __init__(self, profile: str = "") -> None:
        self.profile = profile
        # (campaign, parent, moves) -> the candidate's variant id, or None when it is invalid
        # or rewrites to its parent: a wave re-reads the same candidates for as long as the best holds,
        # and rewriting and hashing each again was most of a wave's time at 1,000 slots.
        self._ids: dict[tuple[str, str, tuple[Move, ...]], str | None] = {}
        self._constants: tuple[str, list[Constant]] | None = None

    async def propose(self, request: ProposalRequest) -> list[Proposal]:
        return self.plan(request)

    def _take(self, wave: _Wave, moves: tuple[Move, ...], kind: str) -> None:
        """Add the candidate to the wave unless it is known, the parent, or invalid."""
        request = wave.request
        key = (request.campaign, request.parent_id, moves)
        if key in self._ids and (self._ids[key] is None or self._ids[key] in wave.known):
            return  # known, invalid or the parent itself, without rewriting the parent
        if len(self._ids) >= ID_CACHE:
            self._ids.clear()
        if _rejected(moves, wave.values, wave.domains, self.profile):
            self._ids[key] = None
            return  # a value no trainer accepts (a batch that is no whole number of rows)
        source = rewrite(request.parent_source, {m.name: m.new for m in moves}, wave.found)
        variant_id = variant_id_for(request.campaign, source)
        self._ids[key] = None if source == request.parent_source else variant_id
        if source == request.parent_source or variant_id in wave.known:
            return
        wave.known.add(variant_id)
        wave.proposals.append(
            Proposal(
                title=title_of(moves),
                source=source,
                parent_id=request.parent_id,
                rationale=_rationale(moves, kind, request, wave.outcomes),
            )
        )

    def constants_of(self, source: str) -> list[Constant]:
        """find_constants of the parent, kept while the parent stays the same."""
        if self._constants is None or self._constants[0] != source:
            self._constants = (source, find_constants(source))
        return list(self._constants[1])

    def plan(self, request: ProposalRequest) -> list[Proposal]:
        try:
            found = self.constants_of(request.parent_source)
            consts = tunable(found, self.profile)
        except SyntaxError as exc:
            raise StrategyExhausted(
                f"the parent {request.parent_id} does not parse ({exc.msg}, line {exc.lineno}); "
                "the grid has no constants to perturb"
            ) from exc
        domains = {c.name: domain_of(c.name, c.value) for c in consts}
        values = {c.name: c.value for c in consts}
        candidates, outcomes, rng = _candidates(request, consts, domains)
        wave = _Wave(request, found, values, domains, outcomes, set(request.known_ids))
        for moves, kind in candidates:
            if len(wave.proposals) >= request.k:
                break
            self._take(wave, moves, kind)
        # A fleet wider than the grid's whole list (in flight and asked for: about its
        # slots and look-ahead) draws on wider screens; a small one never does.
        wanted = request.k + len(request.in_flight_titles)
        wide = wanted > max(len(candidates), WIDE_FLEET)
        if wide and len(wave.proposals) < request.k:
            # Then random points, as many as it takes: ideas never run out for a wide fleet.
            draws = RANDOM_DRAWS_PER_PROPOSAL * request.k
            screens = [(m, "screen") for m in wide_screens(consts, outcomes.usable, rng)]
            randoms = ((m, "random") for m in random_points(consts, outcomes.usable, rng, draws))
            for moves, kind in itertools.chain(screens, randoms):
                if len(wave.proposals) >= request.k:
                    break
                self._take(wave, moves, kind)
        proposals = wave.proposals
        if not proposals and not request.in_flight_titles and request.k > 0:
            raise StrategyExhausted(
                f"every grid point around {request.parent_id} has been tried "
                f"({len(consts)} constants, steps down to x0.92/x1.09, the fitted minima, "
                "factorial combinations); start a campaign with the claude strategy to go further"
            )
        return proposals
