"""Several proposers and several launchers of one tier, each its own process: they share
the work without proposing a variant twice or overfilling the fleet, and a SIGKILLed one's
share is taken over by the others."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.broker import EmbeddedNats
from services.bus import Bus, Delivery
from services.contracts import (
    MAX_RUN_ATTEMPTS,
    ResultEvaluated,
    RunFinished,
    RunRequested,
    RunStarted,
    VariantProposed,
)
from tests.distributed_helpers import Fleet, start_campaign_cli, wait_completed
from tests.e2e_helpers import REPO, history, sim_env
from tests.eventually import eventually
from tests.fake_anthropic import FakeAnthropic

LOOKAHEAD = 2


@pytest.fixture
def fleet(tmp_path: Path, nats_server: EmbeddedNats) -> Iterator[Fleet]:
    env = sim_env(
        tmp_path,
        nats_server.url,
        NIGHTSHIFT_CAMPAIGN="many",
        NIGHTSHIFT_LOOKAHEAD=str(LOOKAHEAD),
        NIGHTSHIFT_LEASE_TTL_S="3",
        NIGHTSHIFT_ACK_WAIT_S="4",
    )
    f = Fleet(env, tmp_path)
    yield f
    f.stop_all()


def start_launchers(fleet: Fleet, n: int, slots: int) -> None:
    for k in range(1, n + 1):
        fleet.start(
            f"launcher-{k}", "launcher", NIGHTSHIFT_LAUNCHER_ID=f"L{k}", NIGHTSHIFT_SLOTS=str(slots)
        )


async def audit(bus: Bus, limit: int) -> list[VariantProposed]:
    """The campaign as the stream holds it: no variant proposed twice, never more than
    `limit` variants in flight (in stream order), exactly one result for every run and one
    for replica 0 of every variant. Returns the proposals."""
    events = await history(bus, [VariantProposed, ResultEvaluated])
    proposed = [e for e in events if isinstance(e, VariantProposed)]
    ids = [e.variant_id for e in proposed]
    assert len(ids) == len(set(ids)), "a variant was proposed twice"
    settled: set[str] = set()
    in_flight = peak = 0
    results: dict[str, int] = {}
    for event in events:
        if isinstance(event, VariantProposed):
            in_flight += 1
            peak = max(peak, in_flight)
        elif isinstance(event, ResultEvaluated):
            if event.status == "infra" and event.attempt < MAX_RUN_ATTEMPTS:
                continue  # run again: not a result yet
            results[event.run_id] = results.get(event.run_id, 0) + 1
            if event.variant_id not in settled:
                settled.add(event.variant_id)
                in_flight -= 1
    assert peak <= limit, f"{peak} variants in flight, more than slots + look-ahead = {limit}"
    assert {r: n for r, n in results.items() if n != 1} == {}, "a run with several results"
    replica0 = {r.rsplit("-", 2)[0] for r in results if r.endswith("-0")}
    assert replica0 == set(ids), "a variant without its one result"
    return proposed


def pid_of(holder: str) -> int:
    """The pid in a lease holder's name (`<host>-<pid>-<random>`)."""
    return int(holder.rsplit("-", 2)[1])


async def test_two_proposers_and_three_launchers_share_one_campaign(
    tmp_path: Path, fleet: Fleet, bus: Bus
) -> None:
    """With the claude strategy (a local Messages API that never repeats an idea), two
    proposers each filling the gap would overfill the fleet: only the lease holder does."""
    fleet.env["NIGHTSHIFT_SIM_TIME_SCALE"] = str(0.5 / 300)
    for name in ("ledger", "evaluator"):
        fleet.start(name)
    with FakeAnthropic(auto=True) as fake:
        claude = {"ANTHROPIC_API_KEY": "sk-test-not-a-real-key", "ANTHROPIC_BASE_URL": fake.url}
        fleet.start("proposer-1", "proposer", **claude)
        fleet.start("proposer-2", "proposer", **claude)
        start_launchers(fleet, 3, slots=2)
        start_campaign_cli(
            fleet.env, "--name", "many", "--max-experiments", "20", "--strategy", "claude"
        )
        await wait_completed(tmp_path, "many", 50)
    proposed = await audit(bus, limit=3 * 2 + LOOKAHEAD)
    assert len(proposed) == 20
    assert {e.proposer for e in proposed} == {"seed", "claude"}
    started = [e for e in await history(bus, [RunStarted]) if isinstance(e, RunStarted)]
    assert {e.host for e in started} == {"sim-L1", "sim-L2", "sim-L3"}, "a launcher sat idle"
    for name, proc in fleet.procs.items():
        assert proc.poll() is None, f"{name} exited"


async def test_a_sigkilled_proposer_mid_wave_is_taken_over(
    tmp_path: Path, fleet: Fleet, bus: Bus
) -> None:
    """The holder is killed on the first source of a large wave (48 slots join at once):
    the standby takes the campaign over and nothing is lost or proposed twice."""
    fleet.env["NIGHTSHIFT_SIM_TIME_SCALE"] = str(1.0 / 300)
    for name in ("ledger", "evaluator"):
        fleet.start(name)
    fleet.start("proposer-1", "proposer")
    fleet.start("proposer-2", "proposer")
    start_campaign_cli(fleet.env, "--name", "many", "--max-experiments", "80")
    # No launcher yet: the holder proposes the seed, whose replicates fill the look-ahead,
    # then waits for slots.
    holder = ""

    async def leased() -> bool:
        nonlocal holder
        entry = await bus.campaigns.read_lease("many")
        holder = entry.holder if entry else ""
        return bool(holder)

    await eventually(leased, 30, "a proposer to take the campaign's lease", interval=0.1)
    victim = next(n for n, p in fleet.procs.items() if p.pid == pid_of(holder))

    async def lookahead_taken() -> bool:
        # The seed and its two replicate runs (noise_runs 3) fill the look-ahead.
        events = await history(bus, [VariantProposed, RunRequested])
        seed = sum(isinstance(e, VariantProposed) for e in events)
        return seed >= 1 and sum(isinstance(e, RunRequested) for e in events) >= 2

    await eventually(lookahead_taken, 30, "the seed and its replicates", interval=0.1)
    first_wave = max(
        e.wave for e in await history(bus, [VariantProposed]) if isinstance(e, VariantProposed)
    )
    cut: list[VariantProposed] = []
    seen_at_kill: list[int] = []

    async def on_source(_msg: object) -> None:
        # A wave stores every source, then publishes every variant (pipelined): the kill
        # on its first source lands mid-wave, before its variants are all out.
        if not seen_at_kill:
            os.kill(pid_of(holder), signal.SIGKILL)
            seen_at_kill.append(len(cut))

    async def on_proposed(event: VariantProposed, _: Delivery) -> None:
        if event.wave > first_wave:
            cut.append(event)

    subs = await bus.subscribe_lossy({VariantProposed: on_proposed})
    subs.append(await bus.nc.subscribe(f"$O.{bus.sources.name}.C.>", cb=on_source))
    start_launchers(fleet, 3, slots=16)
    await eventually(lambda: bool(seen_at_kill), 30, "the wave for the new slots", interval=0.05)
    killed_at = asyncio.get_running_loop().time()
    await eventually(lambda: bool(cut), 30, "the standby's wave", interval=0.05)
    for sub in subs:
        await sub.unsubscribe()
    fleet.procs[victim].wait(10)

    async def taken_over() -> bool:
        entry = await bus.campaigns.read_lease("many")
        return entry is not None and entry.holder != holder

    await eventually(taken_over, 15, "the standby to take the campaign over", interval=0.1)
    takeover_s = asyncio.get_running_loop().time() - killed_at
    # Within the lease's ttl (3 s here), a renewal tick, and slack for a loaded machine.
    assert takeover_s < 3 + 5, takeover_s
    await wait_completed(tmp_path, "many", 50)
    proposed = await audit(bus, limit=3 * 16 + LOOKAHEAD)
    assert len(proposed) == 80
    # Cut short: the smallest such wave is one launcher's 16 slots.
    assert seen_at_kill[0] < 16, f"the kill came after the whole wave {cut[0].wave}"


async def test_a_sigkilled_launcher_of_three_loses_its_slots_and_its_runs_go_elsewhere(
    tmp_path: Path, fleet: Fleet, bus: Bus
) -> None:
    fleet.env["NIGHTSHIFT_SIM_TIME_SCALE"] = str(3.0 / 300)  # runs of 3 s: the kill lands mid-run
    for name in ("ledger", "evaluator", "proposer"):
        fleet.start(name)
    start_launchers(fleet, 3, slots=2)
    start_campaign_cli(fleet.env, "--name", "many", "--max-experiments", "12")
    url = tmp_path / "ledger.url"

    async def fleet_view() -> dict[str, object]:
        if not url.exists():
            return {}
        async with httpx.AsyncClient(base_url=url.read_text().strip(), timeout=5) as http:
            response = await http.get("/campaigns/many/overview")
        tiers = response.json()["fleet"]["tiers"] if response.status_code == 200 else []
        return tiers[0] if tiers else {}

    async def whole_fleet() -> bool:
        return (await fleet_view()).get("slots") == 6

    await eventually(whole_fleet, 30, "the ledger to count 3 launchers x 2 slots", interval=0.2)
    assert (await fleet_view())["launchers"] == 3
    running: list[RunStarted] = []

    async def l2_running() -> bool:
        events = await history(bus, [RunStarted, RunFinished])
        done = {e.run_id for e in events if isinstance(e, RunFinished)}
        running[:] = [
            e
            for e in events
            if isinstance(e, RunStarted) and e.host == "sim-L2" and e.run_id not in done
        ]
        return bool(running)

    await eventually(l2_running, 30, "a run on launcher L2", interval=0.1)
    fleet.kill("launcher-2")
    killed_at = asyncio.get_running_loop().time()
    assert await l2_running(), "L2's runs all ended before the kill landed"  # its runs cut short

    async def slots_dropped() -> bool:
        return (await fleet_view()).get("slots") == 4

    await eventually(slots_dropped, 4 + 3, "the fleet to drop L2's slots", interval=0.2)
    assert asyncio.get_running_loop().time() - killed_at < 4 + 2  # ack_wait_s, a poll, slack
    status = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "services.cli",
            "status",
            "--url",
            url.read_text().strip(),
            "--campaign",
            "many",
        ],
        env=fleet.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "default" in status.stdout and "/4 slots busy (2 launchers)" in status.stdout, (
        status.stdout
    )
    await wait_completed(tmp_path, "many", 50)
    await audit(bus, limit=3 * 2 + LOOKAHEAD)
    again = [
        e
        for e in await history(bus, [RunStarted])
        if isinstance(e, RunStarted)
        and e.run_id in {r.run_id for r in running}
        and e.host != "sim-L2"
    ]
    assert {e.run_id for e in again} == {r.run_id for r in running}, "a killed run not run again"
    assert all(e.attempt >= 2 for e in again)
