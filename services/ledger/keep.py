"""Keep rules: does a candidate variant replace the current best? Pure functions.

A rule takes the candidate's ok metric values, the current best's ok metric values (None
when there is no best yet) and the campaign's direction, and returns a `Decision`:

- `keep`: the candidate becomes the best;
- `discard`: it does not;
- `undecided`: the rule wants more evidence (replicates, a validation tier) before it
  decides; the variant stays pending. `strict` never answers this; a noise-aware rule
  (lower by a margin the measured run-to-run noise justifies) will.

New rules register in `RULES` under the name a campaign gives in `keep_rule`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

Decision = Literal["keep", "discard", "undecided"]
KeepRule = Callable[[Sequence[float], Sequence[float] | None, str], Decision]

# Result statuses that are a verdict on the variant itself (it failed, not the machine).
FAILED_STATUSES = frozenset({"crash", "timeout", "diverged", "oom", "implausible"})
# A failure of the infrastructure (preemption, lost machine): no verdict on the variant.
INFRA_STATUS = "infra"


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of no values")
    return sum(values) / len(values)


def better(a: float, b: float, direction: str) -> bool:
    """Is `a` strictly better than `b`? Ties are not improvements."""
    return a > b if direction == "maximize" else a < b


def strict(candidate: Sequence[float], best: Sequence[float] | None, direction: str) -> Decision:
    """Keep when the candidate's mean is strictly better than the best's (or there is no best)."""
    if not candidate:
        return "undecided"
    if not best:
        return "keep"
    return "keep" if better(mean(candidate), mean(best), direction) else "discard"


RULES: dict[str, KeepRule] = {"strict": strict}


def rule_for(name: str) -> tuple[str, KeepRule]:
    """The rule a campaign asked for, falling back to `strict` for a name not known here."""
    if name in RULES:
        return name, RULES[name]
    return "strict", strict


def failure_status(statuses: Sequence[str]) -> str | None:
    """The verdict for a variant with no ok run: `crash` if any run failed on its own account,
    None (still pending) if only the infrastructure failed or nothing came back yet."""
    return "crash" if any(s in FAILED_STATUSES for s in statuses) else None
