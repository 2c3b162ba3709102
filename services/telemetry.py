"""Logs (structlog) and traces (OpenTelemetry), shared by the four services.

Logs are JSON lines, or a console renderer on a TTY. Traces go to an OTLP endpoint when
`OTEL_EXPORTER_OTLP_ENDPOINT` is set, and nowhere otherwise. Trace context crosses NATS
as W3C `traceparent` headers, so one experiment is one trace across all services:
`propose variant` (proposer) -> `handle VariantProposed` (launcher: the run, with backend,
tier, accelerator and cluster) -> `handle RunFinished` (evaluator: status, value) ->
`handle ResultEvaluated` -> `record and decide` (ledger: whether the variant was kept).
Metrics are in services/metrics.py.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO, cast

import msgspec
import stamina.instrumentation
import structlog
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_configured_tracing = False

# Values of keys named like a secret are replaced before a log line is written. Matched
# on whole name parts, so `input_tokens` is logged but `api_key` or `auth_token` is not.
_SECRET_NAMES = {
    "api_key",
    "apikey",
    "password",
    "passwd",
    "token",
    "secret",
    "creds",
    "credentials",
    "authorization",
    "x_api_key",
}
_SECRET_SUFFIXES = ("_key", "_token", "_secret", "_password", "_creds")


def _is_secret_key(key: str) -> bool:
    name = key.lower().replace("-", "_")
    return name in _SECRET_NAMES or name.endswith(_SECRET_SUFFIXES)


def _redact_secrets(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        if _is_secret_key(key):
            event_dict[key] = "[redacted]"
    return event_dict


def fields_of(event: object, *names: str) -> dict[str, Any]:
    """The named attributes of an event, as the keys of a log line about it."""
    return {name: getattr(event, name) for name in names}


class _CurrentStderr(io.TextIOBase):
    """Whatever `sys.stderr` is when a line is written, not when logging was configured: a
    stream replaced since (a test's capture, closed when it ends) is never written to."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(service: str, fmt: str = "", level: str = "info") -> None:
    """Configure structlog once per process; `fmt` is json | console ('' = by TTY)."""
    use_console = fmt == "console" or (fmt == "" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)
    stamina.instrumentation.set_on_retry_hooks([_log_retry])


def _log_retry(details: stamina.instrumentation.RetryDetails) -> None:
    """stamina's retries (a broker briefly away, a wait for a condition) at info level: the
    broker's own disconnect is the warning; a retry scheduled is routine."""
    get_logger(component="retry").info(
        "retry_scheduled",
        retry=details.retry_num,
        wait_s=round(details.wait_for, 3),
        waited_s=round(details.waited_so_far, 3),
        cause=repr(details.caused_by)[:300],
    )


def configure_tracing(service: str) -> None:
    """Install a tracer provider; export over OTLP/HTTP only when an endpoint is set."""
    global _configured_tracing
    if _configured_tracing:
        return
    _configured_tracing = True
    provider = TracerProvider(resource=Resource.create({"service.name": f"nightshift-{service}"}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def get_logger(**context: Any) -> Any:
    """A lazy logger: safe at import time, it follows configure_logging() when first used."""
    return structlog.get_logger(**context)


def tracer() -> trace.Tracer:
    return trace.get_tracer("nightshift")


# Fields of an event that name what a span is about; each becomes a span attribute.
_SPAN_FIELDS = ("campaign", "variant_id", "run_id", "tier", "replica", "attempt", "status")


def event_span_attributes(event: msgspec.Struct) -> dict[str, Any]:
    """The attributes of a span that handles `event`: which campaign, variant, run, tier."""
    fields = msgspec.structs.asdict(event)
    return {name: fields[name] for name in _SPAN_FIELDS if fields.get(name) is not None}


def annotate_span(**attributes: str | int | float | bool | None) -> None:
    """Add attributes to the current span (a handler's); None values are left out."""
    trace.get_current_span().set_attributes(
        {name: value for name, value in attributes.items() if value is not None}
    )


def inject_trace(headers: dict[str, str]) -> dict[str, str]:
    """Add the current span's W3C trace context to NATS headers."""
    propagate.inject(headers)
    return headers


def extract_trace(headers: Mapping[str, str] | None) -> Context:
    """The trace context a message carried (an empty context when it had none)."""
    return propagate.extract(dict(headers or {}))
