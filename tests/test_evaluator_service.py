"""The evaluator service end to end on a real nats-server (and with the sim launcher)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services import contracts as c
from services.bus import Bus, Delivery
from services.evaluator import service as evaluator
from services.launcher import landscape as ls
from services.launcher import service as launcher
from services.settings import Settings
from tests.eventually import eventually
from tests.launcher_helpers import harness_tar, propose

SEED = "DEPTH = 8\nMATRIX_LR = 0.04\nWEIGHT_DECAY = 0.2\nprint('train')\n"
BLOCK = "---\nval_bpb:          0.991234\ntraining_seconds: 300.1\nnum_steps:        953\n"


async def save_campaign(bus: Bus, name: str = "camp", **kw: object) -> c.CampaignStarted:
    await bus.sources.put("h", harness_tar({"prepare.py": ""}))
    fields: dict[str, object] = {
        "campaign": name,
        "seed_digest": await bus.put_source(SEED),
        "harness_key": "h",
    }
    fields.update(kw)
    campaign = c.CampaignStarted(**fields)  # type: ignore[arg-type]
    await bus.campaigns.save(campaign)
    return campaign


def finished(run_id: str, exit_code: int | None, tail: str, **kw: object) -> c.RunFinished:
    fields: dict[str, object] = {
        "campaign": "camp",
        "event_id": f"finished:{run_id}",
        "run_id": run_id,
        "variant_id": "v",
        "tier": "default",
        "exit_code": exit_code,
        "started_at": 1000.0,
        "finished_at": 1325.5,
        "log_key": run_id,
        "log_tail": tail,
    }
    fields.update(kw)
    return c.RunFinished(**fields)  # type: ignore[arg-type]


async def collect(bus: Bus, count: int, stop_when_done: asyncio.Event) -> list[c.ResultEvaluated]:
    results: list[c.ResultEvaluated] = []

    async def on_event(event: c.ResultEvaluated, _delivery: Delivery) -> None:
        assert isinstance(event, c.ResultEvaluated)
        results.append(event)

    stop = asyncio.Event()
    task = asyncio.create_task(bus.follow({c.ResultEvaluated: on_event}, stop=stop))
    try:
        await eventually(lambda: len(results) >= count, timeout=20, what=f"{count} ResultEvaluated")
    finally:
        stop.set()
        stop_when_done.set()
        await asyncio.wait_for(task, 5)
    return results


async def test_finished_runs_become_results(bus: Bus) -> None:
    await save_campaign(bus)
    # A tail cut before the block: the evaluator reads the full log from the logs bucket.
    await bus.logs.put("r-full", ("step 1\n" * 100 + BLOCK).encode())
    events = [
        finished("r-ok", 0, "noise\n" + BLOCK),
        finished("r-full", 0, "step 1\nstep 1\n"),
        finished(
            "r-crash",
            1,
            'Traceback (most recent call last):\n  File "train.py"\n'
            "ZeroDivisionError: division by zero\n",
        ),
        finished("r-nolog", 0, "no block and no log in the bucket\n"),
        finished(
            "r-infra", None, "", infra_failure=True, infra_reason="cluster preempted", attempt=2
        ),
    ]
    for event in events:
        await bus.publish(event)
    stop = asyncio.Event()
    service = asyncio.create_task(evaluator.run(Settings(), bus, stop))
    results = {r.run_id: r for r in await collect(bus, len(events), stop)}
    await asyncio.wait_for(service, 10)
    ok = results["r-ok"]
    assert (ok.status, ok.value, ok.metric, ok.metrics["num_steps"]) == (
        "ok",
        0.991234,
        "val_bpb",
        953.0,
    )
    assert ok.event_id == c.event_id_for("evaluated", "camp", "r-ok", 1)
    assert ok.training_seconds == pytest.approx(325.5)
    assert results["r-full"].status == "ok" and results["r-full"].value == 0.991234
    assert results["r-crash"].status == "crash"
    assert results["r-crash"].crash_reason == "ZeroDivisionError: division by zero"
    assert (
        results["r-nolog"].status == "crash"
        and "no summary block" in results["r-nolog"].crash_reason
    )
    infra = results["r-infra"]
    assert (infra.status, infra.crash_reason, infra.attempt) == ("infra", "cluster preempted", 2)
    assert infra.event_id == "evaluated:camp:r-infra:2"


async def test_a_run_of_an_unknown_campaign_is_dead_lettered_not_awaited(bus: Bus) -> None:
    # A launcher reads the campaign from the KV before it runs anything, so a RunFinished
    # of a campaign that is not there was never run: waiting for it would wait forever.
    await bus.publish(finished("r-late", 0, BLOCK, campaign="late"))
    stop = asyncio.Event()
    service = asyncio.create_task(evaluator.run(Settings(), bus, stop))
    letters: list[c.DeadLettered] = []

    async def on_letter(event: c.DeadLettered, _: Delivery) -> None:
        letters.append(event)

    follow = asyncio.create_task(bus.follow({c.DeadLettered: on_letter}, stop=stop))
    await eventually(lambda: letters, timeout=10, what="a dead letter")
    stop.set()
    await asyncio.wait_for(asyncio.gather(service, follow), 10)
    assert letters[0].campaign == "late" and "not in the campaigns KV" in letters[0].error


async def test_sim_launcher_and_evaluator_together(bus: Bus, tmp_path: Path) -> None:
    campaign = await save_campaign(bus)
    sources = [SEED, ls.set_constants(SEED, {"DEPTH": 10}), SEED + "def broken(:\n"]
    for source in sources:
        await propose(bus, "camp", source)
    stop = asyncio.Event()
    settings = Settings(
        backend="sim",
        slots=4,
        sim_time_scale=0.001,
        sim_noise=0.0,
        run_dir=str(tmp_path / "runs"),
        launcher_id="sim-1",
    )
    services = [
        asyncio.create_task(launcher.run(settings, bus, stop)),
        asyncio.create_task(evaluator.run(settings, bus, stop)),
    ]
    results = {r.variant_id: r for r in await collect(bus, len(sources), stop)}
    await asyncio.wait_for(asyncio.gather(*services), 15)
    truth = ls.Landscape(SEED)
    for source in sources[:2]:
        result = results[c.variant_id_for("camp", source)]
        assert result.status == "ok"
        assert result.value == pytest.approx(truth.true_val_bpb(source), abs=1e-6)
    broken = results[c.variant_id_for("camp", sources[2])]
    assert broken.status == "crash" and broken.crash_reason.startswith("SyntaxError")
    assert campaign.metric == "val_bpb"
