"""`nightshift up`'s live lines for keep decisions: a close call and its verdict, and no
verdict line for a variant that only waited for the seed's first result."""

from __future__ import annotations

import io
from typing import Any

from services.bus import Delivery
from services.contracts import VariantDecided
from services.supervisor import LiveView

DELIVERY = Delivery("ns.variant.decided", 1, 1)


def decided(variant_id: str, decision: str, replicates: int = 0, **fields: Any) -> VariantDecided:
    values: dict[str, Any] = {
        "campaign": "c",
        "variant_id": variant_id,
        "decision": decision,
        "rule": "noise-aware",
        "tier": "default",
        "reason": fields.pop("reason", "r"),
        "n_candidate": 1,
        "n_best": 3,
        "mean_candidate": 0.99,
        "mean_best": 1.0,
        "best_variant_id": "seed",
        "noise": 0.01,
        "margin": 0.02,
        "replicates_requested": replicates,
    }
    return VariantDecided(**(values | fields))


async def test_a_close_call_prints_its_replicates_then_its_verdict() -> None:
    out = io.StringIO()
    view = LiveView("c", out=out, live=True, titles={"v": "LR x2"})
    await view.on_variant_decided(decided("v", "undecided", replicates=2), DELIVERY)
    await view.on_variant_decided(decided("v", "undecided"), DELIVERY)  # still waiting
    await view.on_variant_decided(decided("v", "keep", n_candidate=3, reason="sep"), DELIVERY)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "close call: LR x2" in lines[0] and "2 replicate run(s) requested" in lines[0]
    assert lines[1].strip().startswith("keep after replicates: LR x2") and "(n 3)" in lines[1]


async def test_waiting_for_the_seed_is_no_close_call() -> None:
    out = io.StringIO()
    view = LiveView("c", out=out, live=True)
    await view.on_variant_decided(decided("v", "undecided", reason="waiting"), DELIVERY)
    await view.on_variant_decided(decided("v", "discard"), DELIVERY)
    assert out.getvalue() == ""


async def test_a_verdict_shows_the_runs_it_cancelled_and_a_single_run_past_the_margin() -> None:
    out = io.StringIO()
    view = LiveView("c", out=out, live=True, titles={"v": "LR x2"})
    few_dof = decided("v", "undecided", replicates=1, mean_candidate=0.95, reason="noise on 2 dof")
    await view.on_variant_decided(few_dof, DELIVERY)
    cancelling = decided(
        "v", "discard", n_candidate=2, reason="not better", cancelled_runs=["v-default-2"]
    )
    await view.on_variant_decided(cancelling, DELIVERY)
    first, second = out.getvalue().splitlines()
    assert "better by 0.050000 > margin 0.020000 (n 1 vs 3, noise on 2 dof)" in first
    assert second.endswith("not better; 1 run(s) still out cancelled")
