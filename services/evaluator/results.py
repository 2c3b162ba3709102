"""One ResultEvaluated per RunFinished: read the run's log, classify it, publish the result.

The log tail in the event is usually enough (it holds the summary block or the
traceback); when it has no block, the full log comes from the `logs` bucket.
"""

from __future__ import annotations

from services import contracts as c
from services.bus import Bus, Delivery, PoisonError
from services.evaluator.classify import Evaluation, evaluate_run
from services.metrics import record_result
from services.telemetry import annotate_span, fields_of, get_logger


async def fetch_log_text(bus: Bus, finished: c.RunFinished, metric: str) -> str:
    """The tail when its block has the metric, else the full log (the tail if it is gone)."""
    block = c.parse_summary(finished.log_tail)
    if block is not None and metric in block:
        return finished.log_tail
    if finished.infra_failure or finished.timed_out:
        return finished.log_tail
    try:
        data = await bus.logs.get(finished.log_key or finished.run_id)
    except KeyError:
        return finished.log_tail
    return data.decode(errors="replace")


def result_event(finished: c.RunFinished, evaluation: Evaluation, metric: str) -> c.ResultEvaluated:
    return c.ResultEvaluated(
        **finished.keys("evaluated"),
        status=evaluation.status,
        metric=metric,
        value=evaluation.value,
        metrics=evaluation.metrics,
        crash_reason=evaluation.crash_reason,
        training_seconds=max(0.0, finished.finished_at - finished.started_at),
    )


class Evaluator:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.log = get_logger(component="evaluator")

    async def on_run_finished(self, event: c.RunFinished, _delivery: Delivery) -> None:
        campaign = await self.bus.campaigns.load(event.campaign)
        if campaign is None:
            # The launcher read the campaign from the KV before it ran: a run of a campaign
            # that is not there was never run by a launcher.
            raise PoisonError(
                f"run {event.run_id} names campaign {event.campaign!r}, which is not in the "
                "campaigns KV: no launcher ran it"
            )
        text = await fetch_log_text(self.bus, event, campaign.metric)
        evaluation = evaluate_run(event, text, campaign.metric, campaign.run_timeout_s)
        result = result_event(event, evaluation, campaign.metric)
        await self.bus.publish(result)
        record_result(result)
        annotate_span(status=result.status, value=result.value, crash_reason=result.crash_reason)
        self.log.info(
            "result_evaluated",
            **fields_of(result, "campaign", "variant_id", "run_id", "attempt", "status", "value"),
            crash_reason=result.crash_reason[:200],
        )
