"""`nightshift bench chaos`, short: every service and the nats-server SIGKILLed and restarted
during a distributed sim campaign, forged events injected; nothing lost, nothing counted
twice, nothing forged counted, no finished run run again, no service died on its own."""

from __future__ import annotations

from services.bench_chaos import TARGETS, chaos_bench


async def test_a_campaign_survives_chaos() -> None:
    report = await chaos_bench(experiments=24, seed=1, rounds=1, timeout_s=100.0)
    assert report.completed, report
    assert all(report.kills[t] >= 1 for t in TARGETS), report.kills
    assert report.lost == 0 and report.double_counted == 0, report
    assert report.forged_counted == 0 and report.reruns_of_finished == 0, report
    assert report.unexpected_exits == 0, report.exits
    # every injected event is a dead letter, and the result the evaluator made of the
    # forged RunFinished of each round too
    assert report.dead_letters >= report.injected, report
