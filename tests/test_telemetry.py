"""Traces and metrics of a real campaign: the four services (in this process, as `nightshift
up` runs them) on a real nats-server, the claude strategy against the local Messages API,
the SDK's in-memory span exporter and metric reader.

One experiment is one trace: propose (proposer) -> run (launcher) -> evaluate (evaluator) ->
record and decide (ledger), each span the child of the one whose message it handles. The
metrics add up to what the stream holds for the campaign.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.broker import EmbeddedNats
from services.bus import Bus
from services.campaign import start_campaign
from services.contracts import (
    CampaignStopped,
    ResultEvaluated,
    RunFinished,
    RunStarted,
    VariantProposed,
)
from services.supervisor import wait_until_consumed
from tests.e2e_helpers import history, services_running, sim_env, sim_settings, spawn_service
from tests.eventually import eventually
from tests.fake_anthropic import FakeAnthropic

CAMPAIGN = "observed"
EXPERIMENTS = 8
GPU_USD_PER_HOUR = 36.0


def span_exporter() -> InMemorySpanExporter:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@cache
def metric_reader() -> InMemoryMetricReader:
    """The process's meter provider reads into memory (a provider is installed once)."""
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return reader


def points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return [
        point
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


def of_campaign(found: list[Any]) -> list[Any]:
    return [p for p in found if p.attributes.get("campaign") == CAMPAIGN]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def one(spans: list[ReadableSpan], name: str, consumer: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name and attrs(s).get("consumer") == consumer]
    assert len(found) == 1, (name, consumer, [(s.name, attrs(s)) for s in spans])
    return found[0]


def check_variant_trace(root: ReadableSpan, spans: list[ReadableSpan]) -> None:
    """proposer -> launcher -> evaluator -> ledger, each the child of the one before."""
    mine = [s for s in spans if trace_id(s) == trace_id(root)]
    launcher = one(mine, "handle VariantProposed", "launcher-default")
    evaluator = one(mine, "handle RunFinished", "evaluator")
    ledger = one(mine, "handle ResultEvaluated", "ledger")
    assert parent_of(launcher) == span_id(root)
    assert parent_of(one(mine, "handle VariantProposed", "ledger")) == span_id(root)
    assert parent_of(evaluator) == span_id(launcher)
    assert parent_of(one(mine, "handle RunStarted", "ledger")) == span_id(launcher)
    assert parent_of(ledger) == span_id(evaluator)
    decide = [s for s in mine if s.name == "record and decide"]
    assert [parent_of(s) for s in decide] == [span_id(ledger)]
    variant = attrs(root)["variant_id"]
    run = attrs(launcher)
    assert run["variant_id"] == variant and run["backend"] == "sim"
    assert run["tier"] == "default" and run["accelerator"] and run["cluster"]
    result = attrs(evaluator)
    assert result["variant_id"] == variant and result["status"]
    assert ("value" in result) == (result["status"] == "ok")
    assert isinstance(attrs(decide[0])["best_updated"], bool)


async def run_campaign(tmp_path: Path, url: str, bus: Bus) -> None:
    settings = sim_settings(
        tmp_path,
        url,
        strategy="claude",
        slots=2,
        max_experiments=EXPERIMENTS,
        campaign=CAMPAIGN,
        gpu_usd_per_hour=GPU_USD_PER_HOUR,
        keep_rule="strict",  # one run per variant: each trace holds one run of each stage
        noise_runs=1,
        confirm_jump=0.0,
    )
    async with services_running(settings, url):
        await start_campaign(bus, settings)

        async def completed() -> None:
            while not await history(bus, [CampaignStopped]):
                await asyncio.sleep(0.3)

        await asyncio.wait_for(completed(), 60)
        await wait_until_consumed(bus, "ledger")
        await asyncio.sleep(1.2)  # a fleet status tick after the last run


async def test_a_campaign_is_one_trace_per_variant_and_its_metrics_add_up(
    tmp_path: Path, nats_server: EmbeddedNats, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter, reader = span_exporter(), metric_reader()
    with FakeAnthropic(auto=True) as fake:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-not-a-real-key")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
        await run_campaign(tmp_path, nats_server.url, bus)

    spans = list(exporter.get_finished_spans())
    roots = [s for s in spans if s.name == "propose variant" and attrs(s)["campaign"] == CAMPAIGN]
    assert len(roots) == EXPERIMENTS
    assert len({trace_id(r) for r in roots}) == EXPERIMENTS, "two variants share a trace"
    for root in roots:
        check_variant_trace(root, spans)

    events = await history(bus, [VariantProposed, RunStarted, RunFinished, ResultEvaluated])
    proposed = [e for e in events if isinstance(e, VariantProposed)]
    started = [e for e in events if isinstance(e, RunStarted)]
    finished = [e for e in events if isinstance(e, RunFinished)]
    results = [e for e in events if isinstance(e, ResultEvaluated)]
    assert len(results) == EXPERIMENTS

    runs_started = of_campaign(points(reader, "nightshift.runs.started"))
    assert sum(p.value for p in runs_started) == len(started)
    assert {p.attributes["backend"] for p in runs_started} == {"sim"}
    by_status = Counter(r.status for r in results)
    runs_finished = of_campaign(points(reader, "nightshift.runs.finished"))
    assert {p.attributes["status"]: p.value for p in runs_finished} == dict(by_status)
    durations = of_campaign(points(reader, "nightshift.run.duration"))
    assert sum(p.count for p in durations) == len(results)
    assert sum(p.sum for p in durations) == pytest.approx(sum(r.training_seconds for r in results))

    gpu = of_campaign(points(reader, "nightshift.gpu.cost"))
    held = sum(f.finished_at - f.started_at for f in finished)
    assert sum(p.value for p in gpu) == pytest.approx(held / 3600 * GPU_USD_PER_HOUR)

    costs = [p.llm_cost for p in proposed if p.llm_cost is not None]
    assert len(costs) == EXPERIMENTS - 1  # every variant but the baseline came from Claude
    llm_usd = of_campaign(points(reader, "nightshift.llm.cost"))
    assert sum(p.value for p in llm_usd) == pytest.approx(sum(c.usd for c in costs))
    assert sum(p.value for p in llm_usd) > 0
    tokens: dict[str, float] = defaultdict(float)
    for p in of_campaign(points(reader, "nightshift.llm.tokens")):
        tokens[p.attributes["kind"]] += p.value
    assert tokens["input"] == pytest.approx(sum(c.input_tokens for c in costs))
    assert tokens["output"] == pytest.approx(sum(c.output_tokens for c in costs))
    assert tokens["cache_read"] == pytest.approx(sum(c.cache_read_input_tokens for c in costs))

    queue = [
        p for p in points(reader, "nightshift.queue.depth") if p.attributes["tier"] == "default"
    ]
    utilization = points(reader, "nightshift.slots.utilization")
    assert queue and all(p.value >= 0 for p in queue)
    assert utilization and all(0.0 <= p.value <= 1.0 for p in utilization)


class OtlpReceiver:
    """An HTTP server that records the OTLP/HTTP requests it receives (path, body)."""

    def __init__(self) -> None:
        received: list[tuple[str, bytes]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                received.append((self.path, self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def bodies(self, path: str) -> bytes:
        return b"".join(body for p, body in list(self.received) if p == path)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    found = OtlpReceiver()
    found.thread.start()
    yield found
    found.server.shutdown()


@pytest.fixture
def exporting_launcher(
    tmp_path: Path, nats_server: EmbeddedNats, receiver: OtlpReceiver
) -> Iterator[None]:
    """`python -m services.launcher` (tier `otlp`) with OTEL_EXPORTER_OTLP_ENDPOINT set."""
    env = sim_env(
        tmp_path,
        nats_server.url,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
        OTEL_METRIC_EXPORT_INTERVAL="300",
        NIGHTSHIFT_TIER="otlp",
    )
    proc = spawn_service("launcher", env)
    yield
    proc.terminate()
    proc.wait(20)


async def test_a_service_process_exports_its_metrics_over_otlp(
    exporting_launcher: None, receiver: OtlpReceiver
) -> None:
    """A service's fleet gauges reach the endpoint over OTLP/HTTP (what the compose file's
    collector receives), under the service's name."""

    def exported() -> bool:
        body = receiver.bodies("/v1/metrics")
        return b"nightshift.slots.utilization" in body and b"nightshift.queue.depth" in body

    await eventually(exported, 30, "the launcher's gauges at the OTLP endpoint", 0.2)
    body = receiver.bodies("/v1/metrics")
    assert b"nightshift-launcher" in body  # the resource's service.name
    assert b"otlp" in body  # the tier attribute
