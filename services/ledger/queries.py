"""Read functions over a ledger connection, shared by the HTTP API and the CLI.

Every function takes a connection (`db.open_read(path)` works on a ledger on disk, also
after the system stopped) and returns plain JSON-ready values. A function about one thing
returns None when that thing is unknown.
"""

from __future__ import annotations

import difflib
import json
import sqlite3
from typing import Any, Literal

VariantSort = Literal["val_bpb", "time"]
SortOrder = Literal["asc", "desc"]

_LIST_COLUMNS = (
    "variant_id, campaign, parent_id, source_digest, title, rationale, proposer, wave, "
    "proposed_at, status, verdict, value, ok_runs, decided_at, llm_model, llm_input_tokens, "
    "llm_cache_creation_input_tokens, llm_cache_read_input_tokens, llm_output_tokens, llm_usd, "
    "(SELECT COALESCE(SUM(gpu_usd), 0) FROM run_costs c WHERE c.variant_id = variants.variant_id "
    "AND NOT c.infra_failure) AS gpu_usd"
)


def _variant_dict(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["llm"] = {
        "model": out.pop("llm_model"),
        "input_tokens": out.pop("llm_input_tokens"),
        "cache_creation_input_tokens": out.pop("llm_cache_creation_input_tokens"),
        "cache_read_input_tokens": out.pop("llm_cache_read_input_tokens"),
        "output_tokens": out.pop("llm_output_tokens"),
        "usd": out.pop("llm_usd"),
    }
    out["gpu"] = {"usd": out.pop("gpu_usd")}  # its runs' GPU time (infra failures excluded)
    return out


# --- campaigns --------------------------------------------------------------------------


def list_campaigns(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute(
        """
        SELECT c.name, c.status, c.metric, c.direction, c.started_at, c.stopped_at,
               c.stop_reason, c.best_variant_id, c.best_value, c.halted_reason,
               (SELECT COUNT(*) FROM variants v WHERE v.campaign = c.name
                AND v.proposed_at IS NOT NULL) AS variants
        FROM campaigns c ORDER BY COALESCE(c.started_at, 0), c.name
        """
    )
    return [dict(r) for r in rows]


def campaign(conn: sqlite3.Connection, name: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM campaigns WHERE name = ?", (name,)).fetchone()
    if row is None:
        return None
    out = dict(row)
    out["config"] = json.loads(out["config"]) if out["config"] else None
    return out


def _counts(conn: sqlite3.Connection, sql: str, name: str) -> dict[str, int]:
    return {str(r[0]): int(r[1]) for r in conn.execute(sql, (name,))}


def campaign_summary(conn: sqlite3.Connection, name: str) -> dict[str, Any] | None:
    """The campaign with counts: variants, runs and results by status, best, LLM cost."""
    out = campaign(conn, name)
    if out is None:
        return None
    variants = _counts(
        conn,
        "SELECT status, COUNT(*) FROM variants WHERE campaign = ? "
        "AND proposed_at IS NOT NULL GROUP BY status",
        name,
    )
    runs = _counts(conn, "SELECT state, COUNT(*) FROM runs WHERE campaign = ? GROUP BY state", name)
    results = _counts(
        conn, "SELECT status, COUNT(*) FROM results WHERE campaign = ? GROUP BY status", name
    )
    llm = conn.execute(
        "SELECT COALESCE(SUM(llm_usd), 0) AS usd, COALESCE(SUM(llm_input_tokens), 0) AS input, "
        "COALESCE(SUM(llm_cache_creation_input_tokens), 0) AS cache_creation, "
        "COALESCE(SUM(llm_cache_read_input_tokens), 0) AS cache_read, "
        "COALESCE(SUM(llm_output_tokens), 0) AS output FROM variants WHERE campaign = ?",
        (name,),
    ).fetchone()
    experiments = conn.execute(
        "SELECT COUNT(DISTINCT variant_id) FROM results WHERE campaign = ?", (name,)
    ).fetchone()[0]
    dead = conn.execute("SELECT COUNT(*) FROM dead_letters WHERE campaign = ?", (name,))
    out["counts"] = {
        "proposed": sum(variants.values()),
        "variants": variants,
        "running": runs.get("running", 0),
        "runs": runs,
        "experiments": int(experiments),  # variants with a result
        "evaluated": sum(results.values()),  # results: runs, replicates included
        "results": results,
        "dead_letters": int(dead.fetchone()[0]),
    }
    out["llm"] = {
        "usd": llm["usd"],
        "input_tokens": llm["input"],
        "cache_creation_input_tokens": llm["cache_creation"],
        "cache_read_input_tokens": llm["cache_read"],
        "output_tokens": llm["output"],
    }
    out["gpu"] = gpu_cost(conn, name)
    out["best"] = best(conn, name, with_source=False)
    out["noise"] = noise(conn, name)
    return out


def gpu_cost(conn: sqlite3.Connection, name: str) -> dict[str, float]:
    """A campaign's metered GPU time: all of it, and the part lost to infrastructure failures."""
    row = conn.execute(
        "SELECT COALESCE(SUM(gpu_usd), 0), COALESCE(SUM(gpu_seconds), 0), "
        "COALESCE(SUM(CASE WHEN infra_failure THEN gpu_usd ELSE 0 END), 0) "
        "FROM run_costs WHERE campaign = ?",
        (name,),
    ).fetchone()
    return {"usd": row[0], "gpu_seconds": row[1], "infra_usd": row[2]}


def noise(conn: sqlite3.Connection, name: str) -> dict[str, dict[str, Any]]:
    """The measured run-to-run spread per tier: {tier: {noise, dof, variants, measured_at}}."""
    rows = conn.execute(
        "SELECT tier, noise, dof, variants, measured_at FROM noise WHERE campaign = ? "
        "ORDER BY tier",
        (name,),
    )
    return {r["tier"]: {k: r[k] for k in ("noise", "dof", "variants", "measured_at")} for r in rows}


def decisions(conn: sqlite3.Connection, variant_id: str) -> list[dict[str, Any]]:
    """Every keep-rule decision on a variant, oldest first: the rule, n and mean per side,
    the noise and the margin, how many replicates it requested and how many runs still out
    it cancelled."""
    rows = conn.execute(
        "SELECT status AS decision, rule, tier, reason, runs AS n_candidate, "
        "value AS mean_candidate, best_before_variant_id AS best_variant_id, "
        "best_before_runs AS n_best, best_before_value AS mean_best, noise, margin, "
        "replicates_requested, runs_cancelled, run_id, decided_at FROM keep_decisions "
        "WHERE variant_id = ? ORDER BY decided_at, rowid",
        (variant_id,),
    )
    return [dict(r) for r in rows]


def best(conn: sqlite3.Connection, name: str, *, with_source: bool = True) -> dict[str, Any] | None:
    """The campaign's best variant (with its value, run count and source); None if none yet."""
    row = conn.execute(
        "SELECT best_variant_id, best_value, best_runs, metric, edit_file FROM campaigns "
        "WHERE name = ?",
        (name,),
    ).fetchone()
    if row is None or row["best_variant_id"] is None:
        return None
    out = variant(conn, row["best_variant_id"]) or {"variant_id": row["best_variant_id"]}
    out.pop("runs", None)
    out.update(
        value=row["best_value"],
        runs=row["best_runs"],
        metric=row["metric"],
        edit_file=row["edit_file"],
    )
    if with_source:
        out["source"] = variant_source(conn, row["best_variant_id"])
    return out


def best_history(conn: sqlite3.Connection, name: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT variant_id, value, previous_variant_id, previous_value, ts FROM best_history "
        "WHERE campaign = ? ORDER BY id",
        (name,),
    )
    return [dict(r) for r in rows]


_DEAD_LETTER_COLUMNS = (
    "event_id, campaign, subject, stream_seq, consumer, error, payload_preview, ts"
)


def dead_letters(conn: sqlite3.Connection, name: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        f"SELECT {_DEAD_LETTER_COLUMNS} FROM dead_letters WHERE campaign = ? ORDER BY ts", (name,)
    )
    return [dict(r) for r in rows]


def all_dead_letters(conn: sqlite3.Connection, limit: int = 1000) -> list[dict[str, Any]]:
    """Every dead letter, newest first: those of unknown campaigns and undecodable ones
    (campaign `?`) too."""
    rows = conn.execute(
        f"SELECT {_DEAD_LETTER_COLUMNS} FROM dead_letters ORDER BY ts DESC LIMIT ?", (limit,)
    )
    return [dict(r) for r in rows]


def dead_letter_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Dead letters per campaign they name (`?`: the payload was not readable)."""
    rows = conn.execute("SELECT campaign, COUNT(*) FROM dead_letters GROUP BY campaign")
    return {str(r[0]): int(r[1]) for r in rows}


# --- variants ---------------------------------------------------------------------------


def list_variants(
    conn: sqlite3.Connection,
    name: str,
    status: str | None = None,
    sort: VariantSort = "val_bpb",
    order: SortOrder = "asc",
    limit: int = 100,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Proposed variants of a campaign; `sort=val_bpb` sorts by the metric (unmeasured last)."""
    if sort not in ("val_bpb", "time") or order not in ("asc", "desc"):
        raise ValueError(f"bad sort {sort!r} or order {order!r}")
    if sort == "val_bpb":
        order_by = f"value IS NULL, value {order}, proposed_at {order}"
    else:
        order_by = f"proposed_at {order}, variant_id {order}"
    where, params = "campaign = ? AND proposed_at IS NOT NULL", [name]
    if status is not None:
        where += " AND status = ?"
        params.append(status)
    rows = conn.execute(
        f"SELECT {_LIST_COLUMNS} FROM variants WHERE {where} ORDER BY {order_by} LIMIT ? OFFSET ?",
        (*params, limit, offset),
    )
    return [_variant_dict(r) for r in rows]


def variant(conn: sqlite3.Connection, variant_id: str) -> dict[str, Any] | None:
    """One variant with the proposer's diff and its runs."""
    row = conn.execute(
        f"SELECT {_LIST_COLUMNS}, diff FROM variants WHERE variant_id = ?", (variant_id,)
    ).fetchone()
    if row is None:
        return None
    out = _variant_dict(row)
    out["runs"] = runs(conn, variant_id)
    out["decisions"] = decisions(conn, variant_id)
    return out


def variant_source(conn: sqlite3.Connection, variant_id: str) -> str | None:
    row = conn.execute(
        "SELECT s.text FROM variants v JOIN sources s ON s.digest = v.source_digest "
        "WHERE v.variant_id = ?",
        (variant_id,),
    ).fetchone()
    return None if row is None else str(row["text"])


def variant_diff(conn: sqlite3.Connection, variant_id: str) -> str | None:
    """Unified diff of the variant's source against its parent's (the baseline: against empty).

    Falls back to the diff the proposer sent when a source is missing from the ledger.
    """
    row = conn.execute(
        "SELECT v.parent_id, v.diff, c.edit_file FROM variants v "
        "JOIN campaigns c ON c.name = v.campaign WHERE v.variant_id = ?",
        (variant_id,),
    ).fetchone()
    if row is None:
        return None
    source = variant_source(conn, variant_id)
    parent_id = row["parent_id"]
    parent = variant_source(conn, parent_id) if parent_id else ""
    if source is None or parent is None:
        return str(row["diff"] or "") or None
    fromfile = f"{parent_id}/{row['edit_file']}" if parent_id else "/dev/null"
    lines = difflib.unified_diff(
        parent.splitlines(keepends=True),
        source.splitlines(keepends=True),
        fromfile=fromfile,
        tofile=f"{variant_id}/{row['edit_file']}",
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def lineage(conn: sqlite3.Connection, variant_id: str) -> list[dict[str, Any]] | None:
    """The variant's ancestors, root (baseline) first, ending with the variant itself."""
    chain: list[dict[str, Any]] = []
    current: str | None = variant_id
    visited: set[str] = set()
    while current is not None and current not in visited:
        visited.add(current)
        row = conn.execute(
            "SELECT variant_id, parent_id, title, status, value, proposed_at FROM variants "
            "WHERE variant_id = ?",
            (current,),
        ).fetchone()
        if row is None:
            if not chain:
                return None
            chain.append({"variant_id": current, "missing": True})
            break
        chain.append(dict(row))
        current = row["parent_id"]
    return list(reversed(chain))


# --- runs -------------------------------------------------------------------------------

_RUN_COLUMNS = (
    "r.run_id, r.campaign, r.variant_id, r.tier, r.replica, r.attempt, r.state, r.requested_at, "
    "r.request_reason, r.backend, r.host, r.accelerator, r.slot, r.started_at, r.finished_at, "
    "r.exit_code, r.timed_out, r.cancelled, r.infra_failure, r.infra_reason, r.log_key, "
    "res.status, res.value, res.metrics, res.crash_reason, res.training_seconds, "
    "res.evaluated_at"
)


def _run_dict(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for key in ("timed_out", "cancelled", "infra_failure"):
        out[key] = bool(out[key])
    out["metrics"] = json.loads(out["metrics"]) if out["metrics"] else {}
    return out


def runs(conn: sqlite3.Connection, variant_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        f"SELECT {_RUN_COLUMNS} FROM runs r LEFT JOIN results res ON res.run_id = r.run_id "
        "WHERE r.variant_id = ? ORDER BY r.tier, r.replica",
        (variant_id,),
    )
    return [_run_dict(r) for r in rows]


def run(conn: sqlite3.Connection, run_id: str) -> dict[str, Any] | None:
    row = conn.execute(
        f"SELECT {_RUN_COLUMNS}, r.log_tail FROM runs r "
        "LEFT JOIN results res ON res.run_id = r.run_id WHERE r.run_id = ?",
        (run_id,),
    ).fetchone()
    return None if row is None else _run_dict(row)


def run_log(conn: sqlite3.Connection, run_id: str) -> str | None:
    """The run's full log, or the tail the launcher sent when the full log is not stored."""
    row = conn.execute(
        "SELECT l.text, r.log_tail FROM runs r LEFT JOIN run_logs l ON l.run_id = r.run_id "
        "WHERE r.run_id = ?",
        (run_id,),
    ).fetchone()
    if row is None:
        return None
    text = row["text"] if row["text"] is not None else row["log_tail"]
    return None if text is None else str(text)


def recent_results(conn: sqlite3.Connection, name: str, limit: int = 20) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT r.run_id, r.variant_id, r.tier, r.replica, r.status, r.value, r.crash_reason, "
        "r.evaluated_at, v.title, v.status AS variant_status FROM results r "
        "JOIN variants v ON v.variant_id = r.variant_id WHERE r.campaign = ? "
        "ORDER BY r.seq DESC LIMIT ?",
        (name, limit),
    )
    return [dict(r) for r in rows]


def metric_series(conn: sqlite3.Connection, name: str) -> list[tuple[float, float]]:
    """(evaluated_at, value) of every ok result of a campaign, in evaluation order."""
    rows = conn.execute(
        "SELECT evaluated_at, value FROM results WHERE campaign = ? AND status = 'ok' "
        "AND value IS NOT NULL ORDER BY seq",
        (name,),
    )
    return [(float(r[0]), float(r[1])) for r in rows]


def events_applied(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM events_seen").fetchone()[0])


# --- results.tsv ------------------------------------------------------------------------
