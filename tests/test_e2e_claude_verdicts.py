"""The claude strategy sees the truth, end to end: on a noise-aware sim campaign the real
proposer's requests to a local Messages API server carry the noise the ledger measured,
the replicate runs still out and the keep rule's verdicts (n, means, margin)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.broker import EmbeddedNats
from services.bus import Bus
from services.campaign import start_campaign
from services.supervisor import wait_until_consumed
from tests.anthropic_requests import user_texts
from tests.e2e_helpers import close_call_settings, ledger_rows, services_running
from tests.eventually import eventually
from tests.fake_anthropic import FakeAnthropic


async def test_the_claude_requests_carry_noise_pending_replicates_and_verdicts(
    tmp_path: Path, nats_server: EmbeddedNats, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = close_call_settings(
        tmp_path, nats_server.url, strategy="claude", campaign="truth", max_experiments=40
    )
    with FakeAnthropic(auto=True) as fake:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-not-a-real-key")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)

        async def completed() -> bool:
            rows = ledger_rows(settings.ledger_path, "SELECT status FROM campaigns")
            return rows == [("completed",)]

        async with services_running(settings, nats_server.url):
            await start_campaign(bus, settings)
            await eventually(completed, 150, "the campaign to complete", interval=0.3)
            await wait_until_consumed(bus, "ledger")
        states = ["\n".join(user_texts(body)) for body in fake.requests]

    [noise_row] = ledger_rows(
        settings.ledger_path, "SELECT noise, dof FROM noise WHERE tier = 'default'"
    )
    assert states and "measured noise per tier: not measured yet" in states[0]
    measured = [s for s in states if "measured noise per tier: default 0." in s]
    assert measured, "no request carried the measured noise"
    shown = re.search(r"default (0\.\d+) \((\d+) degrees of freedom\)", measured[-1])
    assert shown is not None and int(shown[2]) <= int(str(noise_row[1]))
    assert any(
        re.search(r"\| undecided \| default \| n \d+ vs \d+ \| [\d.]+ vs [\d.]+ \| 0\.", s)
        for s in states
    ), "no request showed an undecided verdict with its margin"
    assert any(re.search(r"\| discard \| default \| n \d+ vs \d+ \|", s) for s in states)
    assert any(
        re.search(r"^- .+: \d+ run\(s\) on default \(replicate: a close call\)$", s, re.M)
        for s in states
    ), "no request listed a pending replicate"
