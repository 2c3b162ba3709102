"""The noise-aware rule end to end on the sim: the seed's and close calls' replicates are
requested (RunRequested) and run, no variant truly worse than the best it replaced becomes
the best, and a ledger restarted between a replicate request and its result loses nothing."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable

import msgspec

from services.broker import EmbeddedNats
from services.bus import Bus, Delivery
from services.campaign import start_campaign
from services.contracts import (
    BestUpdated,
    ResultEvaluated,
    RunRequested,
    RunStarted,
    VariantDecided,
)
from services.launcher.landscape import true_val_bpb
from services.settings import Settings
from services.supervisor import up, wait_until_consumed
from tests.e2e_helpers import (
    CLOSE_CALLS,
    SEED,
    history,
    ledger_rows,
    services_running,
    wait_completed,
)
from tests.eventually import eventually


async def test_replicates_are_run_and_no_truly_worse_variant_becomes_the_best(
    e2e_settings: Callable[..., Settings], nats_server: EmbeddedNats, bus: Bus
) -> None:
    settings = e2e_settings(
        campaign="honest", max_experiments=24, keep_rule="noise-aware", noise_runs=3, **CLOSE_CALLS
    )
    close_call: asyncio.Future[RunRequested] = asyncio.get_running_loop().create_future()

    async def on_request(event: RunRequested, _: Delivery) -> None:
        if event.reason.startswith("replicate") and not close_call.done():
            close_call.set_result(event)

    follow_stop = asyncio.Event()
    follower = asyncio.create_task(bus.follow({RunRequested: on_request}, stop=follow_stop))
    others = ["proposer", "launcher", "evaluator"]
    async with services_running(settings, nats_server.url, others):
        await start_campaign(bus, settings)
        async with services_running(settings, nats_server.url, ["ledger"]):
            request = await asyncio.wait_for(close_call, 60)
        # The ledger is down; the replicate it asked for runs and is evaluated meanwhile.

        async def evaluated() -> bool:
            found = await history(bus, [ResultEvaluated])
            return any(isinstance(e, ResultEvaluated) and e.run_id == request.run_id for e in found)

        await eventually(evaluated, 30, f"the result of {request.run_id} while the ledger is down")
        async with services_running(settings, nats_server.url, ["ledger"]):
            await wait_completed(settings)
            await wait_until_consumed(bus, "ledger")
    follow_stop.set()
    await follower

    requested = [e for e in await history(bus, [RunRequested]) if isinstance(e, RunRequested)]
    started = {e.run_id for e in await history(bus, [RunStarted]) if isinstance(e, RunStarted)}
    decided = [e for e in await history(bus, [VariantDecided]) if isinstance(e, VariantDecided)]
    bests = [e for e in await history(bus, [BestUpdated]) if isinstance(e, BestUpdated)]
    # The seed ran noise_runs times; every requested replicate was run by the launcher.
    assert sum(r.reason.startswith("noise") for r in requested) == 2
    assert {r.run_id for r in requested} <= started
    # The close call the ledger asked about before its restart was decided after it.
    final = [d for d in decided if d.variant_id == request.variant_id and d.n_candidate > 1]
    assert final and final[-1].decision in ("keep", "discard", "undecided")
    assert any(d.decision == "undecided" for d in decided)
    undecided_now = ledger_rows(
        settings.ledger_path, "SELECT variant_id FROM variants WHERE verdict = 'undecided'"
    )
    assert undecided_now == [], "the campaign completed with a variant still undecided"
    # No best was truly worse than the one it replaced (the sim knows the truth).
    seed = SEED.read_text()
    sources = {b.variant_id: (await bus.get_source(b.source_digest)) for b in bests}
    truth = {vid: true_val_bpb(src, seed, settings.sim_seed) for vid, src in sources.items()}
    for best in bests:
        if best.previous_variant_id is not None and best.previous_variant_id in truth:
            assert truth[best.variant_id] < truth[best.previous_variant_id], best
    assert all(b.rule == "noise-aware" and b.margin is not None for b in bests[1:])


async def test_up_prints_the_close_calls_and_their_replicates(
    e2e_settings: Callable[..., Settings],
) -> None:
    settings = e2e_settings(campaign="shown", max_experiments=16, **CLOSE_CALLS)
    out = io.StringIO()
    assert await asyncio.wait_for(up(settings, out), 120) == 0
    text = out.getvalue()
    assert "replicate run(s) requested" in text, text
    assert "replicate " in text and "-default-1:" in text
    assert "campaign shown completed" in text


async def test_two_tiers_promote_on_the_validate_tiers_launcher(
    e2e_settings: Callable[..., Settings], nats_server: EmbeddedNats, bus: Bus
) -> None:
    screen = e2e_settings(
        campaign="tiered",
        max_experiments=16,
        tiers="screen,validate",
        tier="screen",
        launcher_id="screen-1",
        **CLOSE_CALLS,
    )
    validate = msgspec.structs.replace(
        screen, tier="validate", launcher_id="validate-1", slots=2, sim_speed=1.09
    )

    async with (
        services_running(screen, nats_server.url),
        services_running(validate, nats_server.url, ["launcher"]),
    ):
        await start_campaign(bus, screen)
        await wait_completed(screen)
        await wait_until_consumed(bus, "ledger")

    requested = [e for e in await history(bus, [RunRequested]) if isinstance(e, RunRequested)]
    started = [e for e in await history(bus, [RunStarted]) if isinstance(e, RunStarted)]
    bests = [e for e in await history(bus, [BestUpdated]) if isinstance(e, BestUpdated)]
    on_tier = {s.run_id: (s.tier, s.host) for s in started}
    to_validate = [r for r in requested if r.tier == "validate"]
    assert len(to_validate) >= 3  # the seed's runs there at least
    for r in to_validate:
        assert on_tier[r.run_id] == ("validate", "sim-validate-1"), r.run_id
    assert {s.tier for s in started if s.replica == 0 and s.run_id.endswith("-screen-0")} == {
        "screen"
    }
    assert bests and all(b.tier == "validate" for b in bests)
    seed = SEED.read_text()
    sources = {b.variant_id: (await bus.get_source(b.source_digest)) for b in bests}
    truth = {vid: true_val_bpb(src, seed, screen.sim_seed) for vid, src in sources.items()}
    for best in bests[1:]:
        assert truth[best.variant_id] < truth[best.previous_variant_id or ""], best
