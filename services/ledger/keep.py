"""Keep rules: does a candidate variant replace the current best? Pure functions.

A rule takes the `Evidence` (the candidate's ok metric values, the current best's on the
same tier, the campaign's direction, the measured run-to-run noise and the policy) and
returns a `Verdict`:

- `keep`: the candidate becomes the best;
- `discard`: it does not;
- `undecided`: the rule wants more evidence: `want_candidate` / `want_best` say how many
  ok runs each side should have before it decides again (the ledger requests replicates).

`strict` is autoresearch's single-run rule: keep when the mean is lower, however little.
`noise-aware` keeps only when the two means separate at the configured confidence given
the measured noise: the improvement must exceed `margin = t * noise * sqrt(1/n_c + 1/n_b)`
(t: the one-sided Student quantile of the confidence at the noise's degrees of freedom,
since the noise is itself measured from a few runs; the normal one when it is known). A candidate that is not better at
all is discarded at once; one that is better by less than the margin gets replicates
until it separates or the replicate cap is reached (then it is discarded).

New rules register in `RULES` under the name a campaign gives in `keep_rule`.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

Decision = Literal["keep", "discard", "undecided"]

# Result statuses that are a verdict on the variant itself (it failed, not the machine).
FAILED_STATUSES = frozenset({"crash", "timeout", "diverged", "oom", "implausible"})
# A failure of the infrastructure (preemption, lost machine): no verdict on the variant.
INFRA_STATUS = "infra"
DEFAULT_RULE = "noise-aware"
# A keep on the candidate's single run needs a noise measured with at least this many
# degrees of freedom. The seed's 3 runs give 2: their spread is below a third of the true
# one about 1 time in 10 (below a fifteenth 1 in 250), and every comparison of the first
# wave shares that estimate, so one lucky agreement would let several single runs through
# at once. Until then a winner gets a replicate, which also adds to the measure.
SINGLE_RUN_KEEP_DOF = 6


@dataclass(frozen=True)
class Policy:
    """The settings a rule reads: confidence of a keep and the replicate cap."""

    confidence: float = 0.99  # one-sided: the chance a keep is not a fluke of the noise
    max_runs: int = 5  # ok runs of a candidate beyond which it is discarded undecided


@dataclass(frozen=True)
class Evidence:
    candidate: Sequence[float]  # the candidate's ok values on the tier
    best: Sequence[float] | None  # the current best's ok values on the tier (None: no best)
    direction: str = "minimize"
    noise: float | None = None  # measured std of one run on the tier (None: not measured)
    policy: Policy = Policy()
    noise_dof: int = 0  # degrees of freedom of that measure (0: the noise is known exactly)


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    rule: str
    n_candidate: int
    n_best: int
    mean_candidate: float | None
    mean_best: float | None
    noise: float | None  # the spread the rule used
    margin: float | None  # the improvement needed at these n (None: not computed)
    reason: str
    want_candidate: int = 0  # ok runs wanted before deciding again (undecided only)
    want_best: int = 0
    wait_for_runs: bool = False  # decide only once every run already requested is back
    replicate_reason: str = "replicate: a close call"  # why the runs it wants are requested


KeepRule = Callable[[Evidence], Verdict]


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of no values")
    return sum(values) / len(values)


def better(a: float, b: float, direction: str) -> bool:
    """Is `a` strictly better than `b`? Ties are not improvements."""
    return a > b if direction == "maximize" else a < b


def gain(candidate: float, best: float, direction: str) -> float:
    """How much better the candidate is (positive: better) in the campaign's direction."""
    return candidate - best if direction == "maximize" else best - candidate


def _verdict(ev: Evidence, rule: str, decision: Decision, reason: str, **extra: object) -> Verdict:
    best = list(ev.best or [])
    fields: dict[str, object] = {
        "decision": decision,
        "rule": rule,
        "n_candidate": len(ev.candidate),
        "n_best": len(best),
        "mean_candidate": mean(ev.candidate) if ev.candidate else None,
        "mean_best": mean(best) if best else None,
        "noise": ev.noise,
        "margin": None,
        "reason": reason,
    }
    fields.update(extra)
    return Verdict(**fields)  # type: ignore[arg-type]


def strict(ev: Evidence) -> Verdict:
    """Keep when the candidate's mean is strictly better than the best's (or there is no best)."""
    if not ev.candidate:
        return _verdict(ev, "strict", "undecided", "no ok run yet")
    if not ev.best:
        return _verdict(ev, "strict", "keep", "no best yet")
    if better(mean(ev.candidate), mean(ev.best), ev.direction):
        return _verdict(ev, "strict", "keep", "better mean", margin=0.0)
    return _verdict(ev, "strict", "discard", "not better than the best", margin=0.0)


def _t_cdf(t: float, dof: int) -> float:
    """P(T <= t) for Student's t with an integer dof >= 1, t >= 0 (Abramowitz-Stegun 26.7.3)."""
    theta = math.atan(t / math.sqrt(dof))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if dof % 2:
        series, term = 0.0, math.cos(theta)
        for k in range(3, dof + 1, 2):
            series += term
            term *= c2 * (k - 1) / k
        a = 2 / math.pi * (theta + s * series) if dof > 1 else 2 / math.pi * theta
    else:
        series, term = 0.0, 1.0
        for k in range(2, dof + 1, 2):
            series += term
            term *= c2 * (k - 1) / k
        a = s * series
    return (1 + a) / 2


@functools.cache
def quantile(confidence: float, dof: int = 0) -> float:
    """The one-sided quantile of a confidence: Student's t with `dof` degrees of freedom
    (the noise is itself an estimate: 2 dof at 0.99 -> 6.96), the normal one for dof 0 (a
    known noise) or a large dof (0.99 -> 2.33)."""
    p = min(max(confidence, 0.5), 1 - 1e-9)
    if dof <= 0 or dof > 1000:
        return statistics.NormalDist().inv_cdf(p)
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, dof) < p else (lo, mid)
    return (lo + hi) / 2


def margin_for(
    noise: float, n_candidate: int, n_best: int, confidence: float, dof: int = 0
) -> float:
    """The improvement that separates two means of n_candidate and n_best runs."""
    return quantile(confidence, dof) * noise * math.sqrt(1 / n_candidate + 1 / n_best)


def runs_wanted(improvement: float, ev: Evidence) -> tuple[int, int]:
    """(candidate, best) ok runs at which `improvement` would clear the margin, capped.

    Replicating only the candidate is tried first; when the best's runs are too few for
    that, both sides go to the same n (the best replicated too when its n is smaller).
    """
    n_c, n_b, cap = len(ev.candidate), len(ev.best or []), ev.policy.max_runs
    q = (improvement / (quantile(ev.policy.confidence, ev.noise_dof) * (ev.noise or 0.0))) ** 2
    if q - 1 / n_b > 0:
        needed = math.ceil(1 / (q - 1 / n_b) - 1e-9)
        if needed <= cap:
            return max(n_c + 1, needed), n_b
    equal = min(cap, max(n_c + 1, math.ceil(2 / q - 1e-9)))
    return equal, max(n_b, equal)


def noise_aware(ev: Evidence) -> Verdict:
    """Keep only an improvement larger than the margin the measured noise justifies."""
    rule = "noise-aware"
    if not ev.candidate:
        return _verdict(ev, rule, "undecided", "no ok run yet")
    if not ev.best:
        return _verdict(ev, rule, "keep", "no best yet")
    n_c, n_b = len(ev.candidate), len(ev.best)
    improvement = gain(mean(ev.candidate), mean(ev.best), ev.direction)
    if improvement <= 0:
        return _verdict(ev, rule, "discard", "not better than the best")
    if ev.noise is None:  # not measured yet: replicate the candidate, which measures it
        if n_c >= ev.policy.max_runs:
            return _verdict(ev, rule, "discard", "replicate cap reached, noise never measured")
        return _verdict(
            ev, rule, "undecided", "noise not measured yet", want_candidate=n_c + 1, want_best=n_b
        )
    margin = margin_for(ev.noise, n_c, n_b, ev.policy.confidence, ev.noise_dof)
    if improvement > margin and n_c == 1 and 0 < ev.noise_dof < SINGLE_RUN_KEEP_DOF:
        reason = f"separated on one run, but the noise has {ev.noise_dof} degrees of freedom"
        return _verdict(
            ev, rule, "undecided", reason, margin=margin, want_candidate=2, want_best=n_b
        )
    if improvement > margin:
        return _verdict(ev, rule, "keep", "means separated", margin=margin, wait_for_runs=True)
    if n_c >= ev.policy.max_runs:
        reason = "replicate cap reached inside the margin"
        return _verdict(ev, rule, "discard", reason, margin=margin, wait_for_runs=True)
    want_c, want_b = runs_wanted(improvement, ev)
    return _verdict(
        ev,
        rule,
        "undecided",
        "better by less than the margin: replicate",
        margin=margin,
        want_candidate=want_c,
        want_best=want_b,
    )


RULES: dict[str, KeepRule] = {"strict": strict, "noise-aware": noise_aware}


def rule_for(name: str) -> tuple[str, KeepRule]:
    """The rule a campaign asked for, falling back to the default for a name not known here."""
    if name in RULES:
        return name, RULES[name]
    return DEFAULT_RULE, RULES[DEFAULT_RULE]


def pooled_noise(groups: Sequence[Sequence[float]]) -> tuple[float | None, int]:
    """Pooled std of the groups (each a variant's ok values on one tier) and its degrees of
    freedom; None when fewer than 2 degrees of freedom (one pair is not a measurement)."""
    squares, dof = 0.0, 0
    for values in groups:
        if len(values) >= 2:
            m = mean(values)
            squares += sum((v - m) ** 2 for v in values)
            dof += len(values) - 1
    return ((squares / dof) ** 0.5 if dof >= 2 else None), dof


def failure_status(statuses: Sequence[str]) -> str | None:
    """The verdict for a variant with no ok run: `crash` if any run failed on its own account,
    None (still pending) if only the infrastructure failed or nothing came back yet."""
    return "crash" if any(s in FAILED_STATUSES for s in statuses) else None
