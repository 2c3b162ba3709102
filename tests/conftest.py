"""Shared fixtures: a real nats-server per test on a free port, with its own store dir; the
sim settings of a whole-system test on it; the claude strategy's scripted Messages API
server and a maker of strategies pointed at it."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from services.broker import EmbeddedNats
from services.bus import Bus
from services.settings import Settings
from tests.claude_helpers import Make, scripted_server, strategy_maker
from tests.e2e_helpers import sim_settings
from tests.fake_anthropic import FakeAnthropic


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
async def bus(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    connected = await Bus.from_settings(Settings(nats_url=nats_server.url), "test")
    yield connected
    await connected.close()


@pytest.fixture
def e2e_settings(tmp_path: Path, nats_server: EmbeddedNats) -> Callable[..., Settings]:
    """`sim_settings` for this test's directory and nats-server: `e2e_settings(**overrides)`."""
    return functools.partial(sim_settings, tmp_path, nats_server.url)


@pytest.fixture(autouse=True)
def no_real_anthropic_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests never reach the real API with a developer's key: a test that wants Claude
    sets a fake key and points ANTHROPIC_BASE_URL at the local Messages-API server."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("NIGHTSHIFT_ANTHROPIC_KEY_FILE", str(tmp_path / "no-anthropic-key"))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeAnthropic]:
    """The claude tests' fake Messages API, scripted answers only, with the client on it."""
    with scripted_server(monkeypatch, tmp_path) as server:
        yield server


@pytest.fixture
def make(fake: FakeAnthropic) -> Make:  # the server runs while strategies are made
    return strategy_maker()
