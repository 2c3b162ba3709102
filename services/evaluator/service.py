"""The evaluator service: one ResultEvaluated per RunFinished (see results.py).

Wiring only: a shared durable consumer of RunFinished, 64 evaluations at a time; a
campaign not yet in the campaigns KV is redelivered until it is.
"""

from __future__ import annotations

import asyncio

from services import contracts as c
from services.bus import Bus
from services.evaluator.results import Evaluator
from services.settings import Settings

DURABLE = "evaluator"
CONCURRENCY = 64  # a wave of a thousand runs ends within a second or two
MAX_DELIVER = 10


async def run(settings: Settings, bus: Bus, stop: asyncio.Event) -> None:
    evaluator = Evaluator(bus)
    await bus.consume(
        DURABLE,
        {c.RunFinished: evaluator.on_run_finished},
        concurrency=CONCURRENCY,
        ack_wait_s=settings.ack_wait_s,
        max_deliver=MAX_DELIVER,
        stop=stop,
    )
