"""One experiment is one trace across the four services (context in NATS headers)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.broker import EmbeddedNats
from services.bus import Bus
from services.campaign import start_campaign
from services.contracts import CampaignStopped
from services.supervisor import wait_until_consumed
from tests.e2e_helpers import history, services_running, sim_settings


def span_exporter() -> InMemorySpanExporter:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


async def test_an_experiment_is_one_trace_from_proposal_to_ledger(
    tmp_path: Path, nats_server: EmbeddedNats, bus: Bus
) -> None:
    exporter = span_exporter()
    settings = sim_settings(
        tmp_path, nats_server.url, max_experiments=4, slots=2, campaign="traced"
    )
    async with services_running(settings, nats_server.url):
        await start_campaign(bus, settings)

        async def completed() -> None:
            while not await history(bus, [CampaignStopped]):
                await asyncio.sleep(0.3)

        await asyncio.wait_for(completed(), 60)
        await wait_until_consumed(bus, "ledger")

    spans = exporter.get_finished_spans()
    roots = [
        s
        for s in spans
        if s.name == "propose variant" and (s.attributes or {}).get("campaign") == "traced"
    ]
    assert len(roots) == 4
    for root in roots:
        assert root.context is not None
        in_trace = [
            s
            for s in spans
            if s.context is not None and s.context.trace_id == root.context.trace_id
        ]
        consumers = {str((s.attributes or {}).get("consumer")) for s in in_trace}
        names = {s.name for s in in_trace}
        assert {"launcher-default", "evaluator", "ledger"} <= consumers, consumers
        assert {"handle VariantProposed", "handle RunFinished", "handle ResultEvaluated"} <= names
