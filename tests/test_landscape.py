"""The sim landscape: a pure, seeded function of a train.py source."""

from __future__ import annotations

import statistics

import pytest

from services.launcher import landscape as ls

FIXTURE = '''"""A train.py-shaped fixture (the real trainer lands separately)."""
import os

DEPTH = 8
ASPECT_RATIO = 64
HEAD_DIM = 128
TOTAL_BATCH_SIZE = 2**19
DEVICE_BATCH_SIZE = 128
EMBEDDING_LR = 0.6
UNEMBEDDING_LR = 0.004
MATRIX_LR = 0.04
SCALAR_LR = 0.5
WEIGHT_DECAY = 0.2
WARMUP_RATIO = 0.0
WARMDOWN_RATIO = 0.5
FINAL_LR_FRAC = 0.0
ADAM_BETA2: float = 0.95
SEED = 42
WINDOW_PATTERN = "SSSL"
USE_COMPILE = True
lowercase = 3


def main() -> None:
    LOCAL = 5
    print(DEPTH * LOCAL)
'''


def with_values(**values: float) -> str:
    return ls.set_constants(FIXTURE, values)


def test_parse_constants_reads_numeric_module_level_upper_case() -> None:
    constants = ls.parse_constants(FIXTURE)
    assert constants["DEPTH"] == 8
    assert constants["TOTAL_BATCH_SIZE"] == 2**19
    assert constants["ADAM_BETA2"] == 0.95
    assert constants["WARMUP_RATIO"] == 0.0
    for absent in ("WINDOW_PATTERN", "USE_COMPILE", "lowercase", "LOCAL"):
        assert absent not in constants
    assert "SEED" not in ls.Landscape(FIXTURE).optimum_values()  # a seed moves noise only
    assert ls.parse_constants("LR = -1e-3\nX = 2 * 3.5\n") == {"LR": -1e-3, "X": 7.0}


def test_set_constants_rewrites_only_the_named_literals() -> None:
    source = with_values(DEPTH=12, MATRIX_LR=0.02)
    constants = ls.parse_constants(source)
    assert constants["DEPTH"] == 12 and constants["MATRIX_LR"] == 0.02
    assert constants["HEAD_DIM"] == 128
    assert 'WINDOW_PATTERN = "SSSL"' in source and "LOCAL = 5" in source


def test_reference_scores_one_and_the_optimum_is_better() -> None:
    scape = ls.Landscape(FIXTURE, seed=0)
    assert scape.true_val_bpb(FIXTURE) == pytest.approx(ls.REFERENCE_BPB, abs=1e-9)
    best = scape.optimum_source(FIXTURE)
    assert scape.true_val_bpb(best) == pytest.approx(ls.OPTIMUM_BPB, abs=1e-9)
    # Halfway to the optimum (in each constant's own coordinates) lies in between.
    half = {}
    for name, opt in scape.optimum_values().items():
        ref = ls.parse_constants(FIXTURE)[name]
        half[name] = (ref * opt) ** 0.5 if ref > 0 else (ref + opt) / 2
    assert ls.OPTIMUM_BPB < scape.true_val_bpb(with_values(**half)) < ls.REFERENCE_BPB


def test_landscape_is_deterministic_per_seed() -> None:
    variant = with_values(DEPTH=10, MATRIX_LR=0.05)
    assert ls.Landscape(FIXTURE, 0).true_val_bpb(variant) == ls.Landscape(FIXTURE, 0).true_val_bpb(
        variant
    )
    assert ls.Landscape(FIXTURE, 0).optimum_values() != ls.Landscape(FIXTURE, 1).optimum_values()
    assert ls.true_val_bpb(variant, FIXTURE) == ls.Landscape(FIXTURE).true_val_bpb(variant)


def test_interactions_make_the_bowl_non_separable() -> None:
    scape = ls.Landscape(FIXTURE, seed=0)
    assert scape.pairs, "a few pairwise interactions"
    i, j, _ = scape.pairs[0]
    a, b = scape.axes[i], scape.axes[j]
    ref = ls.parse_constants(FIXTURE)

    def moved(axis: ls._Axis) -> float:
        return ref[axis.name] * 1.5 if axis.log_space else ref[axis.name] + axis.unit

    f = scape.true_val_bpb
    both = f(with_values(**{a.name: moved(a), b.name: moved(b)}))
    separate = f(with_values(**{a.name: moved(a)})) + f(with_values(**{b.name: moved(b)}))
    assert both - separate + f(FIXTURE) != pytest.approx(0.0, abs=1e-9)


def test_observation_noise_is_seeded_by_key() -> None:
    scape = ls.Landscape(FIXTURE)
    one = scape.observe(FIXTURE, "0:run-a", noise=7e-4, failure_rate=0.5)
    again = scape.observe(FIXTURE, "0:run-a", noise=7e-4, failure_rate=0.5)
    other = scape.observe(FIXTURE, "0:run-b", noise=7e-4, failure_rate=0.5)
    assert one == again and one.val_bpb != other.val_bpb
    values = [scape.observe(FIXTURE, f"k{i}", 7e-4, 0.5).val_bpb or 0.0 for i in range(400)]
    assert statistics.mean(values) == pytest.approx(1.0, abs=2e-4)
    assert statistics.stdev(values) == pytest.approx(7e-4, rel=0.2)


@pytest.mark.parametrize(
    ("values", "failure"),
    [
        ({"DEPTH": 400}, "oom"),
        ({"DEVICE_BATCH_SIZE": 8192}, "oom"),
        ({"MATRIX_LR": 4.0}, "diverged"),
        ({"WEIGHT_DECAY": 20.0}, "diverged"),
    ],
)
def test_far_values_fail_at_about_the_configured_rate(
    values: dict[str, float], failure: str
) -> None:
    scape = ls.Landscape(FIXTURE)
    source = with_values(**values)
    observations = [scape.observe(source, f"k{i}", 7e-4, 0.3) for i in range(500)]
    failed = [o for o in observations if o.failure]
    assert 0.22 < len(failed) / len(observations) < 0.38
    assert {o.failure for o in failed} == {failure}
    assert failed[0].culprit == next(iter(values)) and failed[0].val_bpb is None
    assert all(o.val_bpb is not None and o.val_bpb > 1.0 for o in observations if not o.failure)


def test_small_models_and_rates_and_near_values_never_fail() -> None:
    scape = ls.Landscape(FIXTURE)
    for source in (
        with_values(DEPTH=1),
        with_values(EMBEDDING_LR=0.0006),
        with_values(DEPTH=10, MATRIX_LR=0.05),
    ):
        assert not any(scape.observe(source, f"k{i}", 7e-4, 1.0).failure for i in range(50))


def test_a_source_that_does_not_parse_crashes() -> None:
    obs = ls.Landscape(FIXTURE).observe("DEPTH = (\n", "k", 7e-4, 0.5)
    assert obs.failure == "crash" and obs.val_bpb is None and "SyntaxError" in obs.detail


def test_values_stay_plausible_far_away() -> None:
    value = ls.Landscape(FIXTURE).true_val_bpb(with_values(DEPTH=10**9, MATRIX_LR=1e6))
    assert 1.0 < value < ls.OPTIMUM_BPB + ls.CEILING


def test_default_reference_is_read_lazily() -> None:
    try:
        reference = ls.default_reference()
    except FileNotFoundError as exc:
        assert "train.py" in str(exc)
    else:
        assert ls.true_val_bpb(reference) == pytest.approx(1.0, abs=1e-9)
