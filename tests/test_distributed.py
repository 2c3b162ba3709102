"""Distributed mode and faults: each service its own process (`python -m services.<name>`)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.broker import EmbeddedNats
from services.bus import Bus
from services.contracts import ResultEvaluated, RunFinished, RunStarted
from tests.distributed_helpers import SERVICES, Fleet, start_campaign_cli, wait_completed
from tests.e2e_helpers import REPO, history, sim_env
from tests.eventually import eventually


@pytest.fixture
def fleet_env(tmp_path: Path, nats_server: EmbeddedNats) -> dict[str, str]:
    return sim_env(tmp_path, nats_server.url, NIGHTSHIFT_CAMPAIGN="dist")


@pytest.fixture
def fleet(tmp_path: Path, fleet_env: dict[str, str]) -> Iterator[Fleet]:
    f = Fleet(fleet_env, tmp_path)
    yield f
    f.stop_all()


async def test_each_service_in_its_own_process(
    tmp_path: Path, fleet: Fleet, fleet_env: dict[str, str], bus: Bus
) -> None:
    for name in SERVICES:
        fleet.start(name)
    out = start_campaign_cli(fleet_env, "--name", "dist", "--max-experiments", "12")
    assert '"campaign": "dist"' in out
    await wait_completed(tmp_path, "dist", 90)
    results = [e for e in await history(bus, [ResultEvaluated]) if isinstance(e, ResultEvaluated)]
    assert len({r.variant_id for r in results}) == 12


async def test_sigkilled_launcher_reruns_the_run_and_the_ledger_keeps_one_result(
    tmp_path: Path, fleet: Fleet, fleet_env: dict[str, str], bus: Bus
) -> None:
    # Runs of 3 s so the kill lands mid-run; 6 experiments on 2 slots.
    fleet.env = {
        **fleet_env,
        "NIGHTSHIFT_SIM_TIME_SCALE": str(3.0 / 300.0),
        "NIGHTSHIFT_SLOTS": "2",
        "NIGHTSHIFT_ACK_WAIT_S": "5",
    }
    for name in SERVICES:
        fleet.start(name)
    start_campaign_cli(fleet.env, "--name", "dist", "--max-experiments", "6")

    started: list[RunStarted] = []

    async def some_run_started() -> bool:
        started.extend(e for e in await history(bus, [RunStarted]) if isinstance(e, RunStarted))
        return bool(started)

    await eventually(some_run_started, 30, "a run to start", interval=0.2)
    victim = started[0].run_id
    fleet.kill("launcher")
    finished_before = [
        e
        for e in await history(bus, [RunFinished])
        if isinstance(e, RunFinished) and e.run_id == victim
    ]
    assert finished_before == [], "the run finished before the launcher was killed"
    fleet.start("launcher")
    await wait_completed(tmp_path, "dist", 120)
    attempts = [
        e.attempt
        for e in await history(bus, [RunStarted])
        if isinstance(e, RunStarted) and e.run_id == victim
    ]
    assert len(attempts) >= 2 and attempts[-1] >= 2, attempts
    async with httpx.AsyncClient(base_url=(tmp_path / "ledger.url").read_text().strip()) as http:
        tsv = (await http.get("/campaigns/dist/results.tsv")).text
    variant = started[0].variant_id
    assert [line.split("\t")[0] for line in tsv.splitlines()[1:]].count(variant) == 1
    assert len(tsv.splitlines()) == 1 + 6


async def test_services_survive_a_nats_server_restart(
    tmp_path: Path, fleet: Fleet, fleet_env: dict[str, str], nats_server: EmbeddedNats, bus: Bus
) -> None:
    fleet.env = {**fleet_env, "NIGHTSHIFT_SIM_TIME_SCALE": str(1.0 / 300.0)}
    for name in SERVICES:
        fleet.start(name)
    start_campaign_cli(fleet.env, "--name", "dist", "--max-experiments", "16")

    async def some_results() -> bool:
        return len(await history(bus, [ResultEvaluated])) >= 3

    await eventually(some_results, 60, "three results", interval=0.2)
    nats_server.stop()  # same port, same store dir
    await asyncio.sleep(2.0)
    nats_server.start()
    await wait_completed(tmp_path, "dist", 150)
    results = [e for e in await history(bus, [ResultEvaluated]) if isinstance(e, ResultEvaluated)]
    assert len({r.variant_id for r in results}) == 16
    for name in SERVICES:
        assert fleet.procs[name].poll() is None, f"{name} exited after the broker restart"


def test_campaign_cli_needs_a_broker(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    env["NIGHTSHIFT_HOME"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "campaign", "start"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "NATS_URL" in done.stderr


async def test_services_and_the_cli_pass_nats_credentials(tmp_path: Path) -> None:
    """A broker that refuses anonymous clients: every service process and the CLI connect
    with the user and password from the settings, and a campaign runs to completion."""
    server = EmbeddedNats(tmp_path / "nats-auth", user="nightshift", password="pw-9f3k").start()
    env = sim_env(
        tmp_path,
        server.url,
        NIGHTSHIFT_CAMPAIGN="auth",
        NIGHTSHIFT_NATS_USER="nightshift",
        NIGHTSHIFT_NATS_PASSWORD="pw-9f3k",
    )
    fleet = Fleet(env, tmp_path)
    try:
        for name in SERVICES:
            fleet.start(name)
        start_campaign_cli(env, "--name", "auth", "--max-experiments", "6")
        await wait_completed(tmp_path, "auth", 90)
        refused = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "services.cli", "campaign", "start", "--name", "auth"],
            env={**env, "NIGHTSHIFT_NATS_PASSWORD": "wrong"},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        fleet.stop_all()
        server.stop()
    for name in SERVICES:
        text = (tmp_path / f"{name}.log").read_text()
        assert "pw-9f3k" not in text, f"the NATS password reached the {name} log"
        assert "Authorization Violation" not in text, text[-2000:]
    assert refused.returncode == 1
    assert "refused" in refused.stderr and "NIGHTSHIFT_NATS_PASSWORD" in refused.stderr
