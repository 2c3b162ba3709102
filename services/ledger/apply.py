"""What each stored event does to the ledger's tables: one function per event type.

Shaped like optuna's journal storage replay (`_apply_create_study`, `_apply_create_trial`,
...): each function takes its concrete event type and the `Ctx` of the transaction
`projection.apply_event` opened, and returns the events to publish (the keep decisions,
replicate requests and noise measurements a result leads to). `projection` registers each
on its dispatcher by the type in its signature.

The ledger accepts only what happened: a run or result event must name a variant proposed
in its campaign, and a result (or a run's end) a run the launcher started. An event that
names what has not been applied raises `Unreferenced`; the service then waits for it (the
message is redelivered) while an earlier message is still unhandled, and dead-letters it
once none is, so a result never becomes a placeholder, is never counted, never the best.
Later attempts of a run replace earlier ones, and an older attempt arriving late is ignored.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import msgspec

from services import contracts
from services.contracts import (
    CampaignStarted,
    CampaignStopped,
    DeadLettered,
    Event,
    ProposerHalted,
    ResultEvaluated,
    RunFinished,
    RunRequested,
    RunStarted,
    VariantProposed,
)
from services.ledger import keep, resume
from services.ledger.evidence import seed_replicates
from services.ledger.references import ensure_campaign, ensure_run, require_run, require_variant
from services.ledger.verdict import Outbox, decide, event_key


@dataclass(frozen=True)
class Ctx:
    """The transaction an event is applied in, and what the service fetched for it."""

    conn: sqlite3.Connection
    seq: int  # the order in which the ledger applied this event
    source_text: str | None = None  # the source a VariantProposed names
    log_text: str | None = None  # the full log of a RunFinished


def record_only(_ev: Event, _ctx: Ctx) -> Outbox:
    """An event with nothing to project: `events_seen` records it, and that is all.

    The events the ledger itself publishes (BestUpdated, VariantDecided, NoiseMeasured)
    come back this way.
    """
    return []


def campaign_started(ev: CampaignStarted, ctx: Ctx) -> Outbox:
    """Record a (re)start; a stopped campaign started again gets its undone runs back."""
    conn = ctx.conn
    restarted = resume.was_stopped(conn, ev)
    conn.execute(
        """
        INSERT INTO campaigns(name, config, metric, direction, keep_rule, edit_file, status,
                              started_at)
        VALUES (:campaign, :config, :metric, :direction, :keep_rule, :edit_file, 'running', :ts)
        ON CONFLICT(name) DO UPDATE SET
            config = excluded.config, metric = excluded.metric,
            direction = excluded.direction, keep_rule = excluded.keep_rule,
            edit_file = excluded.edit_file,
            started_at = COALESCE(campaigns.started_at, excluded.started_at),
            status = CASE WHEN campaigns.stopped_at > excluded.started_at
                          THEN campaigns.status ELSE 'running' END,
            stopped_at = CASE WHEN campaigns.stopped_at > excluded.started_at
                              THEN campaigns.stopped_at END,
            stop_reason = CASE WHEN campaigns.stopped_at > excluded.started_at
                               THEN campaigns.stop_reason END,
            stop_detail = CASE WHEN campaigns.stopped_at > excluded.started_at
                               THEN campaigns.stop_detail END
        """,
        msgspec.structs.asdict(ev) | {"config": contracts.encode(ev).decode()},
    )
    undone: Outbox = [*resume.runs_left_undone(conn, ev)] if restarted else []
    return undone


def campaign_stopped(ev: CampaignStopped, ctx: Ctx) -> Outbox:
    conn = ctx.conn
    ensure_campaign(conn, ev.campaign)
    status = "completed" if ev.reason == "completed" else "stopped"
    conn.execute(
        "UPDATE campaigns SET status = ?, stopped_at = ?, stop_reason = ?, stop_detail = ? "
        "WHERE name = ?",
        (status, ev.ts, ev.reason, ev.detail, ev.campaign),
    )
    # Launchers skip the runs of a stopped campaign: those not started are cancelled until
    # a resume requests them again (resume.py). Not a decision's cancel (no
    # cancel_requested_at): their results, when they come, count.
    conn.execute(
        "UPDATE runs SET state = 'cancelled', cancel_reason = ? "
        "WHERE campaign = ? AND state = 'requested'",
        (f"campaign {status}", ev.campaign),
    )
    return []


def proposer_halted(ev: ProposerHalted, ctx: Ctx) -> Outbox:
    conn = ctx.conn
    ensure_campaign(conn, ev.campaign)
    conn.execute(
        "INSERT OR IGNORE INTO proposer_halts(event_id, campaign, reason, detail, ts) "
        "VALUES (?, ?, ?, ?, ?)",
        (event_key(ev), ev.campaign, ev.reason, ev.detail, ev.ts),
    )
    conn.execute(
        "UPDATE campaigns SET halted_reason = ?, halted_detail = ? WHERE name = ?",
        (ev.reason, ev.detail, ev.campaign),
    )
    return []


def dead_lettered(ev: DeadLettered, ctx: Ctx) -> Outbox:
    conn = ctx.conn
    conn.execute(
        "INSERT OR IGNORE INTO dead_letters(event_id, campaign, subject, stream_seq, consumer, "
        "error, payload_preview, ts) VALUES (:key, :campaign, :subject_name, :stream_seq, "
        ":consumer, :error, :payload_preview, :ts)",
        msgspec.structs.asdict(ev) | {"key": event_key(ev)},
    )
    return []


# --- variants and runs ------------------------------------------------------------------


def variant_proposed(ev: VariantProposed, ctx: Ctx) -> Outbox:
    """Record a proposal; a duplicate proposal (another wave proposed it too) adds its LLM cost."""
    conn = ctx.conn
    ensure_campaign(conn, ev.campaign)
    if ctx.source_text is not None:
        conn.execute(
            "INSERT OR IGNORE INTO sources(digest, text) VALUES (?, ?)",
            (ev.source_digest, ctx.source_text),
        )
    cost = ev.llm_cost
    conn.execute(
        """
        INSERT INTO variants(variant_id, campaign, parent_id, source_digest, diff, title,
            rationale, proposer, wave, proposed_at, llm_model, llm_input_tokens,
            llm_cache_creation_input_tokens, llm_cache_read_input_tokens, llm_output_tokens,
            llm_usd)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT(variant_id) DO UPDATE SET
            parent_id = CASE WHEN proposed_at IS NULL THEN excluded.parent_id ELSE parent_id END,
            source_digest = COALESCE(source_digest, excluded.source_digest),
            diff = CASE WHEN proposed_at IS NULL THEN excluded.diff ELSE diff END,
            title = CASE WHEN proposed_at IS NULL THEN excluded.title ELSE title END,
            rationale = CASE WHEN proposed_at IS NULL THEN excluded.rationale ELSE rationale END,
            proposer = CASE WHEN proposed_at IS NULL THEN excluded.proposer ELSE proposer END,
            wave = CASE WHEN proposed_at IS NULL THEN excluded.wave ELSE wave END,
            proposed_at = COALESCE(proposed_at, excluded.proposed_at),
            llm_model = COALESCE(llm_model, excluded.llm_model),
            llm_input_tokens = llm_input_tokens + excluded.llm_input_tokens,
            llm_cache_creation_input_tokens =
                llm_cache_creation_input_tokens + excluded.llm_cache_creation_input_tokens,
            llm_cache_read_input_tokens =
                llm_cache_read_input_tokens + excluded.llm_cache_read_input_tokens,
            llm_output_tokens = llm_output_tokens + excluded.llm_output_tokens,
            llm_usd = llm_usd + excluded.llm_usd
        """,
        (
            ev.variant_id,
            ev.campaign,
            ev.parent_id,
            ev.source_digest,
            ev.diff,
            ev.title,
            ev.rationale,
            ev.proposer,
            ev.wave,
            ev.ts,
            cost.model if cost else None,
            cost.input_tokens if cost else 0.0,
            cost.cache_creation_input_tokens if cost else 0.0,
            cost.cache_read_input_tokens if cost else 0.0,
            cost.output_tokens if cost else 0.0,
            cost.usd if cost else 0.0,
        ),
    )
    return seed_replicates(conn, ev)


def run_requested(ev: RunRequested, ctx: Ctx) -> Outbox:
    conn = ctx.conn
    require_variant(conn, ev, ev.variant_id)
    ensure_run(conn, ev.campaign, ev.variant_id, ev.run_id, ev.tier, ev.replica)
    conn.execute(
        "UPDATE runs SET requested_at = COALESCE(requested_at, ?), "
        "request_reason = COALESCE(request_reason, ?) WHERE run_id = ?",
        (ev.ts, ev.reason, ev.run_id),
    )
    conn.execute(  # requested after its campaign stopped: skipped too, until a resume
        "UPDATE runs SET state = 'cancelled', cancel_reason = 'campaign ' || "
        "(SELECT status FROM campaigns WHERE name = runs.campaign) WHERE run_id = ? "
        "AND state = 'requested' AND "
        "(SELECT status FROM campaigns WHERE name = runs.campaign) IN ('stopped', 'completed')",
        (ev.run_id,),
    )
    return []


_RESET_FINISH = (
    "finished_at = NULL, exit_code = NULL, timed_out = 0, cancelled = 0, infra_failure = 0, "
    "infra_reason = '', log_key = NULL, log_tail = NULL"
)


def run_started(ev: RunStarted, ctx: Ctx) -> Outbox:
    conn = ctx.conn
    require_variant(conn, ev, ev.variant_id)
    current = ensure_run(conn, ev.campaign, ev.variant_id, ev.run_id, ev.tier, ev.replica)
    if ev.attempt < current:
        return []  # a late message about an attempt that has been superseded
    if ev.attempt > current:
        conn.execute(
            f"UPDATE runs SET state = 'running', {_RESET_FINISH} WHERE run_id = ?", (ev.run_id,)
        )
    conn.execute(
        "UPDATE runs SET attempt = ?, backend = ?, host = ?, accelerator = ?, slot = ?, "
        "started_at = ?, "
        "state = CASE WHEN state IN ('requested', 'cancelled') THEN 'running' ELSE state END "
        "WHERE run_id = ?",
        (ev.attempt, ev.backend, ev.host, ev.accelerator, ev.slot, ev.ts, ev.run_id),
    )
    return []


def run_finished(ev: RunFinished, ctx: Ctx) -> Outbox:
    """Record a run's end; a run the launcher never started is refused (an infrastructure
    failure before the start, a missing harness, is the one end without a start)."""
    conn = ctx.conn
    require_variant(conn, ev, ev.variant_id)
    if not ev.infra_failure:
        require_run(conn, ev, finished=False)
    current = ensure_run(conn, ev.campaign, ev.variant_id, ev.run_id, ev.tier, ev.replica)
    _record_gpu_cost(conn, ev)  # a late attempt's GPU time was spent all the same
    if ev.attempt < current:
        return []
    conn.execute(
        """
        UPDATE runs SET attempt = ?, started_at = ?, finished_at = ?, exit_code = ?,
            timed_out = ?, cancelled = ?, infra_failure = ?, infra_reason = ?, log_key = ?,
            log_tail = ?,
            state = CASE WHEN state = 'evaluated' AND attempt = ? THEN 'evaluated'
                         ELSE 'finished' END
        WHERE run_id = ?
        """,
        (
            ev.attempt,
            ev.started_at,
            ev.finished_at,
            ev.exit_code,
            ev.timed_out,
            ev.cancelled,
            ev.infra_failure,
            ev.infra_reason,
            ev.log_key,
            ev.log_tail,
            ev.attempt,
            ev.run_id,
        ),
    )
    if ctx.log_text is not None:
        conn.execute(
            "INSERT OR REPLACE INTO run_logs(run_id, text) VALUES (?, ?)", (ev.run_id, ctx.log_text)
        )
    elif ev.attempt > current:
        conn.execute("DELETE FROM run_logs WHERE run_id = ?", (ev.run_id,))
    return []


def _record_gpu_cost(conn: sqlite3.Connection, ev: RunFinished) -> None:
    """Every metered attempt's GPU cost, infrastructure failures included (as such)."""
    if ev.gpu_seconds <= 0 and ev.gpu_usd <= 0:
        return
    conn.execute(
        "INSERT OR REPLACE INTO run_costs(run_id, attempt, campaign, variant_id, tier, "
        "gpu_seconds, gpu_usd, infra_failure) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (ev.run_id, ev.attempt, ev.campaign, ev.variant_id, ev.tier, ev.gpu_seconds,
         ev.gpu_usd, ev.infra_failure),
    )  # fmt: skip


def result_evaluated(ev: ResultEvaluated, ctx: Ctx) -> Outbox:
    """Record the result of a run the launcher started and finished for a proposed variant
    (a later attempt of a run replaces an earlier one), then decide."""
    conn = ctx.conn
    require_variant(conn, ev, ev.variant_id)
    if ev.status == keep.INFRA_STATUS:
        ensure_run(conn, ev.campaign, ev.variant_id, ev.run_id, ev.tier, ev.replica)
    else:
        require_run(conn, ev, finished=True)
    row = conn.execute("SELECT attempt FROM results WHERE run_id = ?", (ev.run_id,)).fetchone()
    if row is not None and int(row["attempt"]) > ev.attempt:
        return []
    conn.execute(
        "INSERT OR REPLACE INTO results(run_id, campaign, variant_id, tier, replica, attempt, "
        "status, value, metrics, crash_reason, training_seconds, evaluated_at, seq) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            ev.run_id,
            ev.campaign,
            ev.variant_id,
            ev.tier,
            ev.replica,
            ev.attempt,
            ev.status,
            ev.value if ev.status == "ok" else None,
            msgspec.json.encode(ev.metrics).decode(),
            ev.crash_reason,
            ev.training_seconds,
            ev.ts,
            ctx.seq,
        ),
    )
    conn.execute(
        "UPDATE runs SET state = 'evaluated', attempt = MAX(attempt, ?) WHERE run_id = ?",
        (ev.attempt, ev.run_id),
    )
    if ev.status != keep.INFRA_STATUS:
        conn.execute(
            "UPDATE variants SET evaluated_seq = COALESCE(evaluated_seq, ?) WHERE variant_id = ?",
            (ctx.seq, ev.variant_id),
        )
    return decide(conn, ev)
