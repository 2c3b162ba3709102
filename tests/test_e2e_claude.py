"""A sim campaign with the claude strategy, the real anthropic client against a local
Messages API server: waves follow free capacity, nothing is lost, costs add up."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from services.broker import EmbeddedNats
from services.bus import Bus
from services.campaign import start_campaign
from services.contracts import CampaignStopped, ResultEvaluated, VariantProposed
from services.supervisor import wait_until_consumed
from tests.e2e_helpers import history, services_running, sim_settings
from tests.fake_anthropic import FakeAnthropic


async def test_claude_campaign_on_the_sim_fleet(
    tmp_path: Path, nats_server: EmbeddedNats, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    slots, lookahead, total = 4, 2, 24
    with FakeAnthropic(auto=True) as fake:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-not-a-real-key")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
        settings = sim_settings(
            tmp_path,
            nats_server.url,
            strategy="claude",
            slots=slots,
            lookahead=lookahead,
            max_experiments=total,
            campaign="claude-e2e",
        )
        async with services_running(settings, nats_server.url):
            await start_campaign(bus, settings)

            async def completed() -> None:
                while not any(
                    isinstance(e, CampaignStopped) for e in await history(bus, [CampaignStopped])
                ):
                    await asyncio.sleep(0.3)

            await asyncio.wait_for(completed(), 150)
            await wait_until_consumed(bus, "ledger")
        requests = len(fake.requests)

    proposed = [e for e in await history(bus, [VariantProposed]) if isinstance(e, VariantProposed)]
    results = [e for e in await history(bus, [ResultEvaluated]) if isinstance(e, ResultEvaluated)]
    assert len(proposed) == total
    assert len({p.variant_id for p in proposed}) == total
    assert {r.variant_id for r in results} == {p.variant_id for p in proposed}, "a variant was lost"
    by_claude = [p for p in proposed if p.proposer == "claude"]
    assert len(by_claude) == total - 1  # all but the baseline
    # Waves follow free capacity: never more than slots + look-ahead at once.
    waves = Counter(p.wave for p in by_claude)
    assert max(waves.values()) <= slots + lookahead
    assert len(waves) >= 3 and requests >= len(waves)
    # Every claude variant carries its share of a request's cost; the ledger adds them up.
    assert all(p.llm_cost is not None and p.llm_cost.usd > 0 for p in by_claude)
    spent = sum(p.llm_cost.usd for p in by_claude if p.llm_cost is not None)
    conn = sqlite3.connect(settings.ledger_path)
    ledger_usd = conn.execute(
        "SELECT SUM(llm_usd) FROM variants WHERE campaign = ?", ("claude-e2e",)
    ).fetchone()[0]
    conn.close()
    assert ledger_usd == pytest.approx(spent)
