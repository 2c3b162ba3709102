"""The keep rules as pure functions: a table of evidence and the verdict each rule gives."""

from __future__ import annotations

import pytest

from services.ledger.keep import (
    Evidence,
    Policy,
    margin_for,
    noise_aware,
    pooled_noise,
    quantile,
    strict,
)

P = Policy(confidence=0.99, max_runs=5)
SIGMA = 0.01  # the measured run-to-run spread in these cases

# (name, candidate, best, direction, noise, decision, want_candidate, want_best)
NOISE_AWARE_CASES = [
    ("no best yet", [1.0], None, "minimize", SIGMA, "keep", 0, 0),
    ("clear loss: discarded without replicates", [1.02], [1.0], "minimize", SIGMA, "discard", 0, 0),
    ("a tie is not an improvement", [1.0], [1.0], "minimize", SIGMA, "discard", 0, 0),
    # margin at 1 vs 3 runs: 2.326 * 0.01 * sqrt(1 + 1/3) = 0.0269
    ("separated at the confidence", [0.96], [1.0, 1.0, 1.0], "minimize", SIGMA, "keep", 0, 0),
    # 0.02 < 0.0269: inside the margin; 1/(q - 1/3) with q = (0.02/0.02326)^2 -> 3 runs
    (
        "inside the margin: replicate the candidate",
        [0.98],
        [1.0] * 3,
        "minimize",
        SIGMA,
        "undecided",
        3,
        3,
    ),
    # a best of 1 run is too few: both sides go to the same n
    (
        "best with fewer runs is replicated too",
        [0.985],
        [1.0],
        "minimize",
        SIGMA,
        "undecided",
        5,
        5,
    ),
    (
        "replicate cap reached inside the margin",
        [0.99] * 5,
        [1.0] * 5,
        "minimize",
        SIGMA,
        "discard",
        0,
        0,
    ),
    (
        "noise not measured: replicate to measure it",
        [0.99],
        [1.0],
        "minimize",
        None,
        "undecided",
        2,
        1,
    ),
    ("maximize: higher is better, separated", [0.70], [0.60] * 3, "maximize", SIGMA, "keep", 0, 0),
    ("maximize: lower is a clear loss", [0.50], [0.60], "maximize", SIGMA, "discard", 0, 0),
    ("maximize: inside the margin", [0.61], [0.60] * 3, "maximize", SIGMA, "undecided", 5, 5),
    ("deterministic metric: any gain separates", [0.999], [1.0], "minimize", 0.0, "keep", 0, 0),
]


@pytest.mark.parametrize(
    ("candidate", "best", "direction", "noise", "decision", "want_c", "want_b"),
    [case[1:] for case in NOISE_AWARE_CASES],
    ids=[case[0] for case in NOISE_AWARE_CASES],
)
def test_noise_aware_rule(
    candidate: list[float],
    best: list[float] | None,
    direction: str,
    noise: float | None,
    decision: str,
    want_c: int,
    want_b: int,
) -> None:
    verdict = noise_aware(Evidence(candidate, best, direction, noise, P))
    assert verdict.decision == decision, verdict.reason
    assert (verdict.want_candidate, verdict.want_best) == (want_c, want_b)
    assert verdict.rule == "noise-aware"
    assert verdict.n_candidate == len(candidate)
    assert verdict.n_best == len(best or [])


def test_the_requested_runs_do_separate_the_observed_difference() -> None:
    """If the means held, the runs the rule asks for clear the margin at their n."""
    verdict = noise_aware(Evidence([0.98], [1.0] * 3, "minimize", SIGMA, P))
    assert verdict.margin is not None and verdict.margin > 0.02
    after = margin_for(SIGMA, verdict.want_candidate, verdict.want_best, P.confidence)
    assert after < 0.02


def test_more_runs_turn_an_undecided_candidate_into_a_keep() -> None:
    assert noise_aware(Evidence([0.98], [1.0] * 3, "minimize", SIGMA, P)).decision == "undecided"
    verdict = noise_aware(Evidence([0.981, 0.979, 0.98], [1.0] * 3, "minimize", SIGMA, P))
    assert verdict.decision == "keep"
    assert verdict.margin == pytest.approx(margin_for(SIGMA, 3, 3, 0.99))


def test_a_higher_confidence_needs_a_larger_improvement() -> None:
    ev = Evidence([0.975], [1.0] * 3, "minimize", SIGMA, Policy(confidence=0.9))
    assert noise_aware(ev).decision == "keep"
    ev99 = Evidence([0.975], [1.0] * 3, "minimize", SIGMA, Policy(confidence=0.999))
    assert noise_aware(ev99).decision == "undecided"


STRICT_CASES = [
    ([1.0], None, "minimize", "keep"),
    ([0.9999], [1.0], "minimize", "keep"),  # inside any noise: strict keeps it anyway
    ([1.0], [1.0], "minimize", "discard"),
    ([0.61], [0.60], "maximize", "keep"),
    ([], [1.0], "minimize", "undecided"),
]


@pytest.mark.parametrize(("candidate", "best", "direction", "decision"), STRICT_CASES)
def test_strict_rule(
    candidate: list[float], best: list[float] | None, direction: str, decision: str
) -> None:
    verdict = strict(Evidence(candidate, best, direction, SIGMA, P))
    assert verdict.decision == decision
    assert verdict.want_candidate == verdict.want_best == 0


def test_pooled_noise_needs_two_degrees_of_freedom() -> None:
    assert pooled_noise([[1.0, 1.02]]) == (None, 1)
    noise, dof = pooled_noise([[1.0, 1.02], [2.0, 2.02], [3.0]])
    assert dof == 2
    assert noise == pytest.approx((0.0002 * 2 / 2) ** 0.5)


def test_student_quantiles() -> None:
    assert quantile(0.99) == pytest.approx(2.3263, abs=1e-4)
    assert quantile(0.99, 2) == pytest.approx(6.9646, abs=1e-3)
    assert quantile(0.99, 1) == pytest.approx(31.821, abs=1e-2)
    assert quantile(0.99, 10) == pytest.approx(2.7638, abs=1e-3)
    assert quantile(0.95, 5) == pytest.approx(2.0150, abs=1e-3)


def test_a_noise_measured_from_few_runs_needs_a_larger_improvement() -> None:
    """The same 0.03 gain separates with a known noise, not with one from 3 runs (2 dof)."""
    known = Evidence([0.97], [1.0] * 3, "minimize", SIGMA, P)
    assert noise_aware(known).decision == "keep"
    measured = Evidence([0.97], [1.0] * 3, "minimize", SIGMA, P, noise_dof=2)
    verdict = noise_aware(measured)
    assert verdict.decision == "undecided"
    assert verdict.margin == pytest.approx(6.9646 * SIGMA * (4 / 3) ** 0.5, rel=1e-3)


def test_a_keep_and_a_discard_at_the_cap_wait_for_the_runs_requested() -> None:
    assert noise_aware(Evidence([0.96], [1.0] * 3, "minimize", SIGMA, P)).wait_for_runs
    assert noise_aware(Evidence([0.99] * 5, [1.0] * 5, "minimize", SIGMA, P)).wait_for_runs
    assert not noise_aware(Evidence([1.02], [1.0], "minimize", SIGMA, P)).wait_for_runs
    assert not strict(Evidence([0.9], [1.0], "minimize", SIGMA, P)).wait_for_runs


def test_a_single_run_is_kept_only_on_a_noise_with_enough_degrees_of_freedom() -> None:
    """Far past the margin on one run: with the seed's 2 degrees of freedom (its 3 runs may
    have agreed by luck) one replicate first; with 6 the single run is enough."""
    few = noise_aware(Evidence([0.90], [1.0] * 3, "minimize", SIGMA, P, noise_dof=2))
    assert few.decision == "undecided" and "degrees of freedom" in few.reason
    assert (few.want_candidate, few.want_best) == (2, 3)
    enough = noise_aware(Evidence([0.90], [1.0] * 3, "minimize", SIGMA, P, noise_dof=6))
    assert enough.decision == "keep"
    two_runs = noise_aware(Evidence([0.90, 0.91], [1.0] * 3, "minimize", SIGMA, P, noise_dof=2))
    assert two_runs.decision == "keep"
