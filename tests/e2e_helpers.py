"""Helpers for whole-system tests: settings, waiting on the ledger, reading the stream."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from services.bus import Bus, Delivery
from services.contracts import AnyEvent, Event
from services.settings import Settings
from services.supervisor import run_services
from tests.eventually import eventually

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "trainer" / "train.py"


def sim_settings(home: Path, url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "nats_url": url,
        "home": str(home),
        "backend": "sim",
        "slots": 4,
        "campaign": "e2e",
        "trainer_dir": str(REPO / "trainer"),
        "max_experiments": 30,
        "http_port": 0,
        "sim_budget_s": 300.0,
        "sim_time_scale": 0.2 / 300.0,
        "log_format": "json",
        "log_level": "warning",
        "noise_floor": 7e-4,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


# One run per variant, decided at once: no seed replicates, the single-run (strict) rule.
SINGLE_RUN: dict[str, object] = {"keep_rule": "strict", "noise_runs": 1}


# Many close calls (a spread of 0.004 is large beside the landscape's steps), no failures,
# and the noise measured from the seed's runs alone.
CLOSE_CALLS: dict[str, object] = {"sim_noise": 0.004, "sim_failure_rate": 0.0, "noise_floor": 0.0}


def close_call_settings(home: Path, url: str, **overrides: object) -> Settings:
    """A noise-aware sim campaign of 24 on 4 slots with CLOSE_CALLS; the seed runs 3 times."""
    values = {"max_experiments": 24, "slots": 4, "keep_rule": "noise-aware", "noise_runs": 3}
    return sim_settings(home, url, **(values | CLOSE_CALLS | overrides))


def spawn_service(name: str, env: dict[str, str], capture: bool = False) -> subprocess.Popen[str]:
    """`python -m services.<name>` as its own process with exactly this environment; its
    output (stdout and stderr together) in `.stdout` when `capture`, else discarded."""
    return subprocess.Popen(
        [sys.executable, "-m", f"services.{name}"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        text=True,
    )


def sim_env(home: Path, url: str, **overrides: str) -> dict[str, str]:
    """Environment for services run as separate processes (distributed mode)."""
    import os

    env = dict(os.environ)
    env.update(
        {
            "NATS_URL": url,
            "NIGHTSHIFT_HOME": str(home),
            "NIGHTSHIFT_BACKEND": "sim",
            "NIGHTSHIFT_SLOTS": "4",
            "NIGHTSHIFT_HTTP_PORT": "0",
            "NIGHTSHIFT_SIM_TIME_SCALE": str(0.2 / 300.0),
            "NIGHTSHIFT_LOG_FORMAT": "json",
            "NIGHTSHIFT_TRAINER_DIR": str(REPO / "trainer"),
            "NIGHTSHIFT_NOISE_FLOOR": "7e-4",
        }
    )
    env.update(overrides)
    return env


@contextlib.asynccontextmanager
async def services_running(
    settings: Settings, url: str, names: list[str] | None = None
) -> AsyncIterator[None]:
    """The four services (or those named) in this process, as `nightshift up` runs them,
    for a block."""
    stop = asyncio.Event()
    buses, tasks = await run_services(settings, url, stop, names)
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=30)
        for b in buses:
            await b.close()


async def history(bus: Bus, types: list[type[Event]]) -> list[AnyEvent]:
    """Every stored event of these types, in stream order."""
    found: list[AnyEvent] = []
    caught_up = asyncio.Event()
    stop = asyncio.Event()

    async def collect(event: AnyEvent, _: Delivery) -> None:
        found.append(event)

    task = asyncio.create_task(
        bus.follow(dict.fromkeys(types, collect), stop=stop, caught_up=caught_up)
    )
    await asyncio.wait_for(caught_up.wait(), 20)
    stop.set()
    await task
    return found


def ledger_rows(db: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return list(conn.execute(sql, args))
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


async def wait_completed(settings: Settings, timeout: float = 120) -> None:
    """Until the ledger (read from its database) has the campaign completed."""
    query = "SELECT status FROM campaigns WHERE name = ?"

    def completed() -> bool:
        return ledger_rows(settings.ledger_path, query, settings.campaign) == [("completed",)]

    await eventually(completed, timeout, f"campaign {settings.campaign} to complete", interval=0.3)
