"""The proposer service against a real nats-server: in-flight control, limits, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import io
import tarfile
import time
from collections.abc import AsyncIterator, Callable, Sized
from dataclasses import dataclass, field

import pytest

from services.bus import Bus, Delivery
from services.contracts import (
    BestUpdated,
    CampaignStarted,
    CampaignStopped,
    FleetStatus,
    ProposerConfig,
    ProposerHalted,
    ResultEvaluated,
    RunRequested,
    VariantProposed,
    event_id_for,
    run_id_for,
    variant_id_for,
)
from services.proposer import topup
from services.proposer.program import program_from_harness
from services.proposer.service import run
from services.settings import Settings
from tests.eventually import eventually

SEED = """import os

DEPTH = 4  # layers
MATRIX_LR = 0.04
EMBEDDING_LR = 0.6
WEIGHT_DECAY = 0.2


def main() -> None:
    print(DEPTH, MATRIX_LR, EMBEDDING_LR, WEIGHT_DECAY)
"""


def holds(items: Sized, n: int) -> Callable[[], bool]:
    return lambda: len(items) == n


@dataclass
class Watch:
    """Everything the proposer published, in stream order."""

    proposed: list[VariantProposed] = field(default_factory=list)
    stopped: list[CampaignStopped] = field(default_factory=list)
    halted: list[ProposerHalted] = field(default_factory=list)
    arrived: dict[str, float] = field(default_factory=dict)  # variant -> monotonic time

    async def on_live(self, event: VariantProposed, _: Delivery) -> None:
        """Core-NATS copy of each variant: when it was published (the replay lags)."""
        self.arrived.setdefault(event.variant_id, time.monotonic())

    async def on_proposed(self, event: VariantProposed, _: Delivery) -> None:
        self.proposed.append(event)

    async def on_stopped(self, event: CampaignStopped, _: Delivery) -> None:
        self.stopped.append(event)

    async def on_halted(self, event: ProposerHalted, _: Delivery) -> None:
        self.halted.append(event)


def harness(program: str = "Only edit train.py.") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = program.encode()
        info = tarfile.TarInfo("program.md")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


async def start_campaign(
    bus: Bus,
    source: str = SEED,
    max_experiments: int = 0,
    lookahead: int = 2,
    strategy: str = "grid",
    noise_runs: int = 1,
) -> CampaignStarted:
    digest = await bus.put_source(source)
    await bus.sources.put("harness-1", harness())
    event = CampaignStarted(
        campaign="c",
        event_id=event_id_for("started", "c"),
        seed_digest=digest,
        harness_key="harness-1",
        max_experiments=max_experiments,
        profile="gpu",
        proposer=ProposerConfig(strategy=strategy, lookahead=lookahead),
        keep_rule="strict",  # no ledger here: the results are decided by being evaluated
        noise_runs=noise_runs,  # 1: no ledger to request the seed's replicates either
    )
    await bus.campaigns.save(event)
    await bus.publish(event)
    return event


async def finish(bus: Bus, variant: VariantProposed, value: float = 1.0) -> None:
    run_id = run_id_for(variant.variant_id, "default", 0)
    await bus.publish(
        ResultEvaluated(
            campaign="c",
            event_id=event_id_for("result", run_id, 1),
            run_id=run_id,
            variant_id=variant.variant_id,
            tier="default",
            status="ok",
            value=value,
        )
    )


@contextlib.asynccontextmanager
async def proposer(bus: Bus, **settings: object) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(run(Settings(**settings), bus, stop))  # type: ignore[arg-type]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def fleet(bus: Bus, slots: int) -> AsyncIterator[None]:
    async def beat() -> None:
        while True:
            await bus.publish(
                FleetStatus(campaign="*", launcher_id="l1", slots={"default": slots}, busy={})
            )
            await asyncio.sleep(0.2)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def watching(bus: Bus) -> AsyncIterator[Watch]:
    watch = Watch()
    stop = asyncio.Event()
    subs = await bus.subscribe_lossy({VariantProposed: watch.on_live})
    task = asyncio.create_task(
        bus.follow(
            {
                VariantProposed: watch.on_proposed,
                CampaignStopped: watch.on_stopped,
                ProposerHalted: watch.on_halted,
            },
            stop=stop,
        )
    )
    try:
        yield watch
    finally:
        stop.set()
        for sub in subs:
            await sub.unsubscribe()
        await task


async def test_keeps_slots_plus_lookahead_in_flight_and_tops_up_per_result(bus: Bus) -> None:
    await start_campaign(bus, lookahead=2)
    async with watching(bus) as watch, fleet(bus, slots=4), proposer(bus):
        await eventually(lambda: len(watch.proposed) == 6, what="4 slots + 2 lookahead")
        await asyncio.sleep(1.5)
        assert len(watch.proposed) == 6  # and no more until results arrive
        baseline = watch.proposed[0]
        assert baseline.title == "baseline" and baseline.parent_id is None and baseline.wave == 0
        assert baseline.variant_id == variant_id_for("c", SEED)
        for v in watch.proposed[1:]:
            assert v.parent_id == baseline.variant_id and v.proposer == "grid" and v.wave >= 1
            assert v.diff.startswith("--- a/train.py\n+++ b/train.py\n")
            assert " -> " in v.title and v.rationale
            source = await bus.get_source(v.source_digest)
            assert variant_id_for("c", source) == v.variant_id
        winner = watch.proposed[1]
        for i, variant in enumerate(watch.proposed[:3]):
            if i == 2:  # the ledger keeps a new best: the next wave grows from it
                await bus.publish(
                    BestUpdated(
                        campaign="c",
                        event_id="best-1",
                        variant_id=winner.variant_id,
                        source_digest=winner.source_digest,
                        value=0.9,
                        runs=1,
                    )
                )
            sent = time.monotonic()
            await finish(bus, variant)
            await eventually(holds(watch.arrived, 7 + i), what="one per result")
            latency = max(watch.arrived.values()) - sent
            assert latency < 0.2, f"a freed slot waited {latency:.3f}s for an idea"
            await eventually(holds(watch.proposed, 7 + i), what="in the stream")
        await asyncio.sleep(0.5)
        assert len(watch.proposed) == 9
        assert watch.proposed[-1].parent_id == winner.variant_id
        assert watch.proposed[-2].parent_id == baseline.variant_id
        assert len({v.variant_id for v in watch.proposed}) == 9


async def test_the_first_wave_queues_behind_the_seeds_replicates(bus: Bus) -> None:
    """With noise_runs 3 the ledger requests replicas 1 and 2 of the seed when it sees the
    baseline; the first wave waits for them, so a launcher takes them first and the noise
    is measured with the first wave's results, not a run length after them."""
    await start_campaign(bus, lookahead=2, noise_runs=3)
    order: list[str] = []

    async def on_event(event: VariantProposed | RunRequested, _: Delivery) -> None:
        order.append(event.title if isinstance(event, VariantProposed) else "seed replicate")

    stop = asyncio.Event()
    follower = asyncio.create_task(
        bus.follow({VariantProposed: on_event, RunRequested: on_event}, stop=stop)
    )
    async with watching(bus) as watch, fleet(bus, slots=4), proposer(bus):
        await eventually(lambda: len(watch.proposed) == 1, what="the baseline")
        await asyncio.sleep(1.0)  # a slow ledger: the wave waits
        assert len(watch.proposed) == 1
        seed = watch.proposed[0]
        for replica in (1, 2):  # as the ledger does (ledger/evidence.py)
            run_id = run_id_for(seed.variant_id, "default", replica)
            await bus.publish(
                RunRequested(
                    campaign="c",
                    event_id=event_id_for("requested", "c", run_id),
                    run_id=run_id,
                    variant_id=seed.variant_id,
                    source_digest=seed.source_digest,
                    tier="default",
                    replica=replica,
                    reason="noise",
                )
            )
        # 4 slots + 2 look-ahead, less the seed's 3 runs.
        await eventually(lambda: len(watch.proposed) == 4, what="the first wave")
        await eventually(lambda: len(order) == 6, what="every event followed")
    stop.set()
    await follower
    assert order[:3] == ["baseline", "seed replicate", "seed replicate"]


async def test_without_a_ledger_the_first_wave_waits_for_the_seed_only_a_while(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(topup, "SEED_RUNS_WAIT_S", 1.0)
    await start_campaign(bus, lookahead=2, noise_runs=3)
    async with watching(bus) as watch, fleet(bus, slots=4), proposer(bus):
        await eventually(lambda: len(watch.proposed) == 1, what="the baseline")
        started = time.monotonic()
        await eventually(lambda: len(watch.proposed) == 6, what="the first wave, later")
        assert time.monotonic() - started >= 0.7


async def test_max_experiments_caps_the_total_and_completes(bus: Bus) -> None:
    await start_campaign(bus, max_experiments=5, lookahead=1)
    async with watching(bus) as watch, fleet(bus, slots=2), proposer(bus):
        await eventually(lambda: len(watch.proposed) == 3, what="2 slots + 1 lookahead")
        done: set[str] = set()
        for step in range(10):
            pending = [v for v in watch.proposed if v.variant_id not in done]
            if not pending:
                break
            done.add(pending[0].variant_id)
            await finish(bus, pending[0], value=1.0 - 0.001 * step)
            await asyncio.sleep(0.1)
        await eventually(lambda: len(watch.stopped) == 1, what="CampaignStopped")
        assert len(watch.proposed) == 5 and len(done) == 5
        stop = watch.stopped[0]
        assert stop.reason == "completed" and "5 experiments" in stop.detail
        assert stop.event_id == event_id_for("stopped", "c")
        assert await bus.campaigns.is_stopped("c")
        await asyncio.sleep(0.5)
        assert len(watch.proposed) == 5


async def test_a_restarted_proposer_does_not_repropose(bus: Bus) -> None:
    await start_campaign(bus, lookahead=2)
    async with watching(bus) as watch, fleet(bus, slots=1):
        async with proposer(bus):
            await eventually(lambda: len(watch.proposed) == 3, what="1 slot + 2 lookahead")
        async with proposer(bus):
            await asyncio.sleep(1.5)
            assert len(watch.proposed) == 3
            await finish(bus, watch.proposed[0])
            await eventually(lambda: len(watch.proposed) == 4, what="top-up after restart")
            await asyncio.sleep(0.3)
        assert len(watch.proposed) == 4
        assert len({v.variant_id for v in watch.proposed}) == 4
        assert [v.wave for v in watch.proposed] == [0, 1, 1, 2]


async def test_exhausted_grid_halts_then_completes(bus: Bus) -> None:
    await start_campaign(bus, source="X_LR = 0.1\n", lookahead=10)
    async with watching(bus) as watch, proposer(bus):
        # No fleet heard from: the look-ahead alone; the grid has 8 points around 0.1.
        await eventually(lambda: len(watch.proposed) == 9, what="baseline + 8 grid points")
        for variant in list(watch.proposed):
            await finish(bus, variant, value=1.0)
        await eventually(lambda: len(watch.stopped) == 1, what="stopped after halt")
        assert len(watch.halted) == 1 and watch.halted[0].reason == "exhausted"
        assert "every grid point" in watch.halted[0].detail
        assert watch.stopped[0].reason == "completed"
        assert len(watch.proposed) == 9


@pytest.mark.parametrize("strategy", ["auto", "claude", "nonsense"])
async def test_unavailable_strategy_falls_back_to_grid(
    bus: Bus, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("NIGHTSHIFT_ANTHROPIC_KEY_FILE", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")
    await start_campaign(bus, lookahead=2, strategy=strategy)
    async with watching(bus) as watch, proposer(bus):
        # timeout: importing the Anthropic SDK takes seconds on a busy machine
        await eventually(lambda: len(watch.proposed) == 2, timeout=30, what="baseline + 1")
        assert watch.proposed[1].proposer == "grid"


def test_program_is_read_from_the_harness() -> None:
    assert program_from_harness(harness("rules")) == "rules"


async def test_a_best_without_a_source_does_not_stall_the_campaign(bus: Bus) -> None:
    """Finding of issue 12: a forged result became the best with no source behind it; the
    proposer then failed every 2 s (`KeyError('sources/')`) and the campaign stalled."""
    await start_campaign(bus, lookahead=1)
    async with watching(bus) as watch, fleet(bus, slots=1), proposer(bus):
        await eventually(lambda: len(watch.proposed) == 2, what="1 slot + 1 lookahead")
        await bus.publish(
            BestUpdated(
                campaign="c",
                event_id="best-without-source",
                variant_id="0123456789abcdef",
                source_digest="",
                value=0.0001,
                runs=1,
            )
        )
        await finish(bus, watch.proposed[0])
        await eventually(lambda: len(watch.proposed) == 3, what="a proposal after the bad best")
        assert watch.proposed[2].parent_id == variant_id_for("c", SEED)  # from the seed
