"""OpenTelemetry metrics: what a team watches on a fleet that runs for weeks.

Each service records into the global meter provider. `configure_metrics` installs the SDK's
MeterProvider, exporting over OTLP/HTTP every `OTEL_METRIC_EXPORT_INTERVAL` ms (60 s by
default) when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; without an endpoint nothing is
installed and recording costs next to nothing. The instruments are made from the API's
proxy meter, so a provider installed later (a test's in-memory reader) receives them.

| instrument | kind | unit | attributes | recorded by |
|---|---|---|---|---|
| nightshift.runs.started | counter | {run} | campaign, tier, backend, accelerator | launcher |
| nightshift.runs.finished | counter | {run} | campaign, tier, status | evaluator |
| nightshift.run.duration | histogram | s | campaign, tier, status | evaluator |
| nightshift.queue.depth | gauge | {run} | tier, launcher | launcher |
| nightshift.slots.utilization | gauge | 1 | tier, launcher | launcher |
| nightshift.llm.tokens | counter | {token} | campaign, model, kind | proposer |
| nightshift.llm.cost | counter | USD | campaign, model | proposer |
| nightshift.gpu.cost | counter | USD | campaign, tier, accelerator | launcher |
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cache

from opentelemetry import metrics
from opentelemetry.metrics import Counter, Histogram
from opentelemetry.metrics import _Gauge as Gauge  # the API's synchronous gauge

from services import contracts as c

_configured = False


def configure_metrics(service: str) -> None:
    """Install a MeterProvider exporting over OTLP/HTTP, only when an endpoint is set."""
    global _configured
    if _configured or not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return
    _configured = True
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    reader = PeriodicExportingMetricReader(OTLPMetricExporter())
    resource = Resource.create({"service.name": f"nightshift-{service}"})
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader], resource=resource))


# Each instrument as (kind, name after "nightshift.", unit, description), by its attribute.
_INSTRUMENTS = {
    "runs_started": ("counter", "runs.started", "{run}", "runs started on a slot"),
    "runs_finished": ("counter", "runs.finished", "{run}", "runs evaluated, by status"),
    "run_duration": ("histogram", "run.duration", "s", "wall seconds a run held its slot"),
    "queue_depth": ("gauge", "queue.depth", "{run}", "work waiting for a launcher"),
    "slot_utilization": ("gauge", "slots.utilization", "1", "busy slots / slots"),
    "llm_tokens": ("counter", "llm.tokens", "{token}", "LLM tokens, by kind"),
    "llm_cost": ("counter", "llm.cost", "USD", "LLM spend"),
    "gpu_cost": ("counter", "gpu.cost", "USD", "accelerator time spent on runs"),
}


class Instruments:
    """The instruments, made once per process from the proxy meter."""

    runs_started: Counter
    runs_finished: Counter
    run_duration: Histogram
    queue_depth: Gauge
    slot_utilization: Gauge
    llm_tokens: Counter
    llm_cost: Counter
    gpu_cost: Counter

    def __init__(self) -> None:
        meter = metrics.get_meter("nightshift")
        make: dict[str, Callable[..., object]] = {
            "counter": meter.create_counter,
            "histogram": meter.create_histogram,
            "gauge": meter.create_gauge,
        }
        for attribute, (kind, name, unit, description) in _INSTRUMENTS.items():
            made = make[kind](f"nightshift.{name}", unit=unit, description=description)
            setattr(self, attribute, made)


@cache
def instruments() -> Instruments:
    return Instruments()


def record_run_started(event: c.RunStarted) -> None:
    instruments().runs_started.add(
        1,
        {
            "campaign": event.campaign,
            "tier": event.tier,
            "backend": event.backend,
            "accelerator": event.accelerator,
        },
    )


def record_result(event: c.ResultEvaluated) -> None:
    """A run's end: counted by status, its slot time in the duration histogram."""
    attributes = {"campaign": event.campaign, "tier": event.tier, "status": event.status}
    instruments().runs_finished.add(1, attributes)
    instruments().run_duration.record(event.training_seconds, attributes)


def record_fleet(tier: str, launcher_id: str, slots: int, busy: int, queued: int) -> None:
    attributes = {"tier": tier, "launcher": launcher_id}
    instruments().queue_depth.set(queued, attributes)
    instruments().slot_utilization.set(busy / slots if slots else 0.0, attributes)


def record_llm_cost(campaign: str, cost: c.LlmCost | None) -> None:
    """A variant's share of its LLM request: tokens by kind, and dollars."""
    if cost is None:
        return
    tokens = {
        "input": cost.input_tokens,
        "output": cost.output_tokens,
        "cache_write": cost.cache_creation_input_tokens,
        "cache_read": cost.cache_read_input_tokens,
    }
    for kind, count in tokens.items():
        if count:
            instruments().llm_tokens.add(
                count, {"campaign": campaign, "model": cost.model, "kind": kind}
            )
    instruments().llm_cost.add(cost.usd, {"campaign": campaign, "model": cost.model})


def record_gpu_cost(finished: c.RunFinished, accelerator: str, usd_per_hour: float) -> float:
    """Dollars of accelerator time a run held: the backend's own metering where it has one
    (skypilot: the tier's price), else the slot's time at `usd_per_hour`."""
    usd = finished.gpu_usd
    if usd <= 0:
        usd = max(0.0, finished.finished_at - finished.started_at) / 3600.0 * usd_per_hour
    if usd > 0:
        instruments().gpu_cost.add(
            usd, {"campaign": finished.campaign, "tier": finished.tier, "accelerator": accelerator}
        )
    return usd
