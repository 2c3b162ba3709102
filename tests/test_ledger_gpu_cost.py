"""GPU cost in the ledger: per variant (its own runs) and per campaign (infra failures too)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from services.contracts import RunFinished
from services.ledger import queries
from services.ledger.db import open_db
from services.ledger.projection import apply_event
from services.ledger_client import format_status
from tests.synthetic import synthetic_campaign


def test_gpu_cost_per_variant_and_campaign_and_in_status(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "ledger.db")
    items = synthetic_campaign("c", variants=3, crash_every=0)
    finished = [e for e, _s, _l in items if isinstance(e, RunFinished)]
    metered = {
        # 300 s on one H100 at $3.60/h = $0.30 per run
        f.event_id: msgspec.structs.replace(f, gpu_seconds=300.0, gpu_usd=0.30)
        for f in finished
    }
    lost = msgspec.structs.replace(  # an earlier attempt of the first run, lost to preemption
        finished[0],
        attempt=0,
        event_id="finished:lost",
        infra_failure=True,
        infra_reason="preempted",
        gpu_seconds=120.0,
        gpu_usd=0.12,
    )
    for event, source, log in [items[0], *items[1:]]:
        applied = metered.get(event.event_id, event)
        apply_event(conn, applied, source_text=source, log_text=log)
    apply_event(conn, lost, log_text="lost")
    apply_event(conn, lost, log_text="lost")  # a redelivery counts once
    first = finished[0].variant_id
    by_variant = {v["variant_id"]: v["gpu"]["usd"] for v in queries.list_variants(conn, "c")}
    assert by_variant[first] == pytest.approx(0.30)  # the lost attempt is not the variant's
    assert sorted(by_variant.values()) == pytest.approx([0.30, 0.30, 0.30])
    assert queries.variant(conn, first)["gpu"]["usd"] == pytest.approx(0.30)  # type: ignore[index]
    summary = queries.campaign_summary(conn, "c")
    assert summary is not None
    assert summary["gpu"] == pytest.approx({"usd": 1.02, "gpu_seconds": 1020.0, "infra_usd": 0.12})
    assert "GPU cost $1.02 (0.28 GPU-hours; $0.12 of it lost to infrastructure failures)" in (
        format_status(summary)
    )
