"""`nightshift bench decisions` on a small budget: it runs every configuration on the sim
and measures its decisions against the landscape's truth."""

from __future__ import annotations

import math

from services.bench_decisions import CONFIGS, decisions_bench


async def test_decisions_bench_measures_every_configuration() -> None:
    # A budget of two waves of the 16-slot fleets: the seed's replicates may be queued behind
    # the whole first wave (16 variants and the look-ahead), and then none of the first 16
    # results is one (seen in full-suite runs; the sequential campaign has no such wave).
    report = await decisions_bench(seeds=1, budget=32, noise=0.003, run_seconds=0.1)
    assert set(report) == set(CONFIGS)
    for name, figures in report.items():
        assert 0.0 <= figures.false_keep_rate <= 1.0, name
        assert 0.0 <= figures.missed_win_rate <= 1.0, name
        assert math.isfinite(figures.final_true_val_bpb) and figures.final_true_val_bpb < 1.1
    assert report["sequential_strict"].replicate_fraction == 0.0
    assert report["strict"].replicate_fraction == 0.0
    # the seed runs 3 times: at least 2 of the 32 runs are replicates
    assert report["noise_aware"].replicate_fraction >= 2 / 32
