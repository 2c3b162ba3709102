"""`nightshift bench decisions` on a small budget: it runs every configuration on the sim
and measures its decisions against the landscape's truth."""

from __future__ import annotations

import math

from services.bench_decisions import CONFIGS, decisions_bench


async def test_decisions_bench_measures_every_configuration() -> None:
    # A budget of two waves of the 16-slot fleets (the seed's replicates run in the first;
    # at one wave, before they were queued ahead of it, none of the first 16 results was one).
    report = await decisions_bench(seeds=1, budget=32, noise=0.003, run_seconds=0.1)
    assert set(report) == set(CONFIGS)
    for name, figures in report.items():
        assert 0.0 <= figures.false_keep_rate <= 1.0, name
        assert 0.0 <= figures.missed_win_rate <= 1.0, name
        assert math.isfinite(figures.final_true_val_bpb) and figures.final_true_val_bpb < 1.1
        # the worst false keep's true loss: 0 without one, never negative (not better)
        assert figures.worst_false_keep >= 0.0, name
        assert figures.false_keep_rate > 0 or figures.worst_false_keep == 0.0, name
    assert report["sequential_strict"].replicate_fraction == 0.0
    assert report["strict"].replicate_fraction == 0.0
    # the seed runs 3 times: at least 2 of the 32 runs are replicates
    assert report["noise_aware"].replicate_fraction >= 2 / 32
