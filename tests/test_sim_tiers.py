"""Sim tiers: each launcher's tier has its speed (more steps in the same budget: a lower
value) and its GPU memory (a variant that needs more is out-of-memory)."""

from __future__ import annotations

import pytest

from services.launcher import landscape as ls
from services.launcher.sim import SPEED_GAIN, peak_vram_mb
from tests.test_launcher_sim import SEED, backend, evaluate, job


async def test_a_variant_larger_than_the_tier_memory_is_out_of_memory() -> None:
    doubled = ls.set_constants(SEED, {"DEPTH": 16})
    assert peak_vram_mb(doubled) / 1024 > 141  # 8x the seed's 45 GB
    h200 = backend(time_scale=1e-5, failure_rate=0.0)  # 141 GB, the default
    status, value, reason = evaluate(await h200.run(job(doubled), lambda _: None))
    assert status == "oom" and value is None, reason
    unlimited = backend(time_scale=1e-5, failure_rate=0.0, memory_gb=0.0)
    status, value, _ = evaluate(await unlimited.run(job(doubled), lambda _: None))
    assert status == "ok" and value is not None
    small = backend(time_scale=1e-5, failure_rate=0.0, memory_gb=40.0)
    status, _, _ = evaluate(await small.run(job(SEED), lambda _: None))  # the seed: 44 GB
    assert status == "oom"


async def test_a_faster_tier_ends_lower_by_the_same_run() -> None:
    base = backend(time_scale=1e-5, failure_rate=0.0)
    fast = backend(time_scale=1e-5, failure_rate=0.0, speed=1.09)
    _, slow_value, _ = evaluate(await base.run(job(SEED, "v-a-0"), lambda _: None))
    _, fast_value, _ = evaluate(await fast.run(job(SEED, "v-a-0"), lambda _: None))
    assert slow_value is not None and fast_value is not None
    # the same run key draws the same noise: the difference is the speed alone (6 decimals)
    assert slow_value - fast_value == pytest.approx(SPEED_GAIN * 0.0862, abs=2e-6)
