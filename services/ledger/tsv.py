"""`results.tsv`: a campaign's results in autoresearch's columns, from the ledger's tables."""

from __future__ import annotations

import json
import sqlite3

from services.contracts import MAX_RUN_ATTEMPTS


def results_tsv(conn: sqlite3.Connection, name: str) -> str | None:
    """The campaign's results in autoresearch's results.tsv format, in evaluation order.

    One row per evaluated variant: commit (the variant id), the metric's mean over ok runs
    (6 decimals; 0.000000 for a crash), memory_gb (peak_vram_mb / 1024, 1 decimal; 0.0 for a
    crash), status keep/discard/crash, description (the title). A variant with only
    infrastructure failures shows as crash once its attempts are spent; one still undecided,
    or whose run is still to be tried again (set aside by a stop, re-queued), is left out.
    """
    camp = conn.execute("SELECT metric FROM campaigns WHERE name = ?", (name,)).fetchone()
    if camp is None:
        return None
    rows = conn.execute(
        """
        SELECT v.variant_id, v.title, v.status, v.value,
               COALESCE(v.evaluated_seq, MIN(r.seq)) AS seq,
               SUM(r.status != 'infra') AS verdicts, MAX(r.attempt) AS attempts
        FROM variants v JOIN results r ON r.variant_id = v.variant_id
        WHERE v.campaign = ? GROUP BY v.variant_id ORDER BY seq, v.variant_id
        """,
        (name,),
    )
    lines = [f"commit\t{camp['metric']}\tmemory_gb\tstatus\tdescription"]
    for row in rows:
        status = row["status"]
        if status == "pending":
            if row["verdicts"] or row["attempts"] < MAX_RUN_ATTEMPTS:
                continue  # undecided (the keep rule waits for more runs), or to be run again
            status = "crash"
        value = row["value"] if status != "crash" and row["value"] is not None else 0.0
        memory = _peak_vram_mb(conn, row["variant_id"]) / 1024 if status != "crash" else 0.0
        title = " ".join(str(row["title"] or "").split())
        lines.append(f"{row['variant_id']}\t{value:.6f}\t{memory:.1f}\t{status}\t{title}")
    return "\n".join(lines) + "\n"


def _peak_vram_mb(conn: sqlite3.Connection, variant_id: str) -> float:
    peak = 0.0
    for (metrics,) in conn.execute(
        "SELECT metrics FROM results WHERE variant_id = ? AND status = 'ok'", (variant_id,)
    ):
        value = json.loads(metrics or "{}").get("peak_vram_mb", 0.0)
        if isinstance(value, int | float):
            peak = max(peak, float(value))
    return peak
