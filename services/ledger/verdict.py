"""Keep decisions in the ledger: after a result, measure the noise, judge, request replicates.

The rules are pure functions in `keep.py`; this module reads the values they need (the
variant's and the best's ok values on the result's tier, the tier's measured noise, the
campaign's policy) and writes the outcome. Every decision is a VariantDecided (with a
BestUpdated for a keep); an `undecided` one comes with the RunRequested of its replicates,
deterministic ids (`<variant>-<tier>-<replica>`) so a redelivered decision requests the
same runs. A keep (or a discard at the replicate cap) waits until every run already
requested of both sides is back, so the means it compares are the ones the rule asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3

import msgspec

from services import contracts
from services.contracts import (
    AnyEvent,
    BestUpdated,
    CampaignStarted,
    Event,
    ResultEvaluated,
    RunCancel,
    RunRequested,
    VariantDecided,
)
from services.ledger import keep
from services.ledger.evidence import (
    campaign_row,
    cancel_requested,
    cancel_useless,
    config,
    measure_noise,
    measured_noise,
    ok_values,
    outstanding,
    policy,
    replicates,
    tier_order,
    top_tier,
)

Outbox = list[AnyEvent]


def event_key(event: Event) -> str:
    """The event's id, or a content hash for an event published without one."""
    if event.event_id:
        return event.event_id
    return "sha256:" + hashlib.sha256(contracts.encode(event)).hexdigest()


def decide(conn: sqlite3.Connection, ev: ResultEvaluated) -> Outbox:
    """Update the variant after a result; the decisions, bests, noise and replicates to publish."""
    camp = campaign_row(conn, ev.campaign)
    tiers = tier_order(camp, ev.tier)
    top = top_tier(conn, ev.variant_id, tiers)
    ok_top = ok_values(conn, ev.variant_id, top) if top else []
    conn.execute(  # the value shown is the mean on the highest tier it ran on
        "UPDATE variants SET value = ?, ok_runs = ? WHERE variant_id = ?",
        (keep.mean(ok_top) if ok_top else None, len(ok_top), ev.variant_id),
    )
    out: Outbox = list(measure_noise(conn, ev.campaign, ev.tier, ev.ts, ev.variant_id))
    if cancel_requested(conn, ev.run_id):
        return out  # a run a decision cancelled (it ran on before the cancel reached it)
    if camp["best_variant_id"] == ev.variant_id:
        best_ok = ok_values(conn, ev.variant_id, ev.tier) if ev.tier == tiers[-1] else []
        if best_ok:  # a replicate of the best on the deciding tier refines its mean
            conn.execute(
                "UPDATE campaigns SET best_value = ?, best_runs = ? WHERE name = ?",
                (keep.mean(best_ok), len(best_ok), ev.campaign),
            )
        return out + _judge_waiting(conn, ev)
    if not ok_values(conn, ev.variant_id, ev.tier):
        _record_failure(conn, ev, camp)
        return out
    found = _judge(conn, ev, ev.variant_id)
    if any(isinstance(e, BestUpdated) for e in found):
        found += _judge_waiting(conn, ev)
    return out + found


def _record_failure(conn: sqlite3.Connection, ev: ResultEvaluated, camp: sqlite3.Row) -> None:
    statuses = [
        r["status"]
        for r in conn.execute("SELECT status FROM results WHERE variant_id = ?", (ev.variant_id,))
    ]
    var = conn.execute("SELECT status FROM variants WHERE variant_id = ?", (ev.variant_id,))
    if keep.failure_status(statuses) and var.fetchone()["status"] == "pending":
        conn.execute(
            "UPDATE variants SET status = 'crash', verdict = 'crash', decided_at = ? "
            "WHERE variant_id = ?",
            (ev.ts, ev.variant_id),
        )
        conn.execute(
            "INSERT OR REPLACE INTO keep_decisions(event_id, campaign, variant_id, run_id, "
            "status, value, runs, rule, best_before_variant_id, best_before_value, tier, "
            "decided_at) VALUES (?, ?, ?, ?, 'crash', NULL, 0, ?, ?, ?, ?, ?)",
            (
                event_key(ev),
                ev.campaign,
                ev.variant_id,
                ev.run_id,
                keep.rule_for(camp["keep_rule"])[0],
                camp["best_variant_id"],
                camp["best_value"],
                ev.tier,
                ev.ts,
            ),
        )


def _judge_waiting(conn: sqlite3.Connection, ev: ResultEvaluated) -> Outbox:
    """Judge again the variants still undecided on the tier (the best changed or got a run),
    and those whose judging waited for runs of the best without a verdict (none recorded)."""
    out: Outbox = []
    rows = conn.execute(
        "SELECT variant_id FROM variants WHERE campaign = ? AND status = 'pending' "
        "AND (verdict = 'undecided' OR (verdict IS NULL AND ok_runs > 0)) "
        "ORDER BY evaluated_seq",
        (ev.campaign,),
    ).fetchall()
    for row in rows:
        if row["variant_id"] != campaign_row(conn, ev.campaign)["best_variant_id"]:
            out += _judge(conn, ev, row["variant_id"])
    return out


def _judge(conn: sqlite3.Connection, ev: ResultEvaluated, variant_id: str) -> Outbox:
    """Apply the campaign's rule to one variant on the highest tier it has values on."""
    camp = campaign_row(conn, ev.campaign)
    tiers = tier_order(camp, ev.tier)
    ev = msgspec.structs.replace(ev, tier=top_tier(conn, variant_id, tiers) or ev.tier)
    rule_name, rule = keep.rule_for(camp["keep_rule"])
    best_id = camp["best_variant_id"]
    if best_id is None and rule_name != "strict" and _seed_pending(conn, camp, variant_id):
        return _await_seed(conn, ev, variant_id, rule_name)
    if best_id and not ok_values(conn, best_id, ev.tier):
        return _await_best(conn, ev, camp, variant_id, best_id)
    noise, dof = measured_noise(conn, ev.campaign, ev.tier)
    evidence = keep.Evidence(
        candidate=ok_values(conn, variant_id, ev.tier),
        best=ok_values(conn, best_id, ev.tier) if best_id else None,
        direction=camp["direction"],
        noise=noise,
        policy=policy(camp),
        noise_dof=dof,
    )
    verdict = _confirm_jump(rule(evidence), evidence, config(camp))
    sides = [v for v in (variant_id, best_id) if v]
    if verdict.wait_for_runs and outstanding(conn, sides, ev.tier):
        return []  # requested runs are still out: decide on the means the rule asked for
    if verdict.decision == "keep" and ev.tier != tiers[-1]:
        return _promote(conn, ev, camp, (variant_id, best_id), verdict, tiers)
    requests: list[RunRequested] = []
    if verdict.decision == "undecided":
        requests = replicates(
            conn, camp, variant_id, ev.tier, verdict.want_candidate, ev.ts, verdict.replicate_reason
        )
        if best_id:
            requests += replicates(conn, camp, best_id, ev.tier, verdict.want_best, ev.ts)
        if not requests and verdict.want_candidate:
            if outstanding(conn, sides, ev.tier) or verdict.n_candidate == 0:
                return []  # waiting for the replicates already requested
            verdict = _give_up(verdict)  # replicates that keep failing: no more evidence
    cancels = cancel_useless(conn, ev.campaign, (variant_id, best_id), verdict.decision, ev.ts)
    decided = _decided_event(ev, variant_id, best_id, verdict, len(requests), cancels)
    _record(conn, ev, decided)
    out: Outbox = [decided, *requests, *cancels]
    if verdict.decision == "keep":
        out.append(_keep(conn, ev, variant_id, verdict, camp))
    return out


def _confirm_jump(
    verdict: keep.Verdict, evidence: keep.Evidence, cfg: CampaignStarted | None
) -> keep.Verdict:
    """A keep improbably far past the best (by more than the campaign's `confirm_jump` share
    of it) must be confirmed: undecided until a replicate is back, then kept only if every
    run of it beats the best (a forged or lucky value does not repeat)."""
    share = cfg.confirm_jump if cfg is not None else 0.0
    if verdict.decision != "keep" or share <= 0 or not evidence.best:
        return verdict
    best = keep.mean(evidence.best)
    if abs(keep.mean(evidence.candidate) - best) <= share * abs(best):
        return verdict
    if len(evidence.candidate) < 2:
        why = f"improbably far past the best (more than {share:g} of it): a replicate must agree"
        return dataclasses.replace(
            verdict,
            decision="undecided",
            reason=why,
            want_candidate=2,
            wait_for_runs=True,
            replicate_reason="replicate: confirm a jump past the best",
        )
    if all(keep.better(v, best, evidence.direction) for v in evidence.candidate):
        return verdict
    return dataclasses.replace(
        verdict, decision="discard", reason="far past the best once, not on its replicate"
    )


def _seed_pending(conn: sqlite3.Connection, camp: sqlite3.Row, variant_id: str) -> bool:
    """Is the campaign's seed still to be measured (so the first best must be the seed, not
    whichever variant finished first)? False for the seed itself and once the seed crashed."""
    cfg = config(camp)
    if cfg is None:
        return False
    row = conn.execute(
        "SELECT variant_id, status FROM variants WHERE campaign = ? AND source_digest = ?",
        (camp["name"], cfg.seed_digest),
    ).fetchone()
    return row is None or (row["variant_id"] != variant_id and row["status"] != "crash")


def _promote(
    conn: sqlite3.Connection,
    ev: ResultEvaluated,
    camp: sqlite3.Row,
    sides: tuple[str, str | None],
    verdict: keep.Verdict,
    tiers: list[str],
) -> Outbox:
    """A win on a tier before the last: run the candidate on the next tier, and the best
    there when it has no run there yet; the keep is decided on the next tier's values."""
    variant_id, best_id = sides
    after = tiers[tiers.index(ev.tier) + 1]
    requests = replicates(conn, camp, variant_id, after, 1, ev.ts)
    if best_id:
        requests += replicates(conn, camp, best_id, after, 1, ev.ts)
    if not requests:
        return []  # promoted already: its runs there decide
    reason = f"better on {ev.tier}: promoted to {after}"
    promoted = dataclasses.replace(verdict, decision="undecided", reason=reason)
    decided = _decided_event(ev, variant_id, best_id, promoted, len(requests))
    _record(conn, ev, decided)
    return [decided, *requests]


def _await_seed(
    conn: sqlite3.Connection, ev: ResultEvaluated, variant_id: str, rule: str
) -> Outbox:
    """Undecided until the seed, the first best, has its result (judged again then)."""
    reason = "waiting for the seed's first result, the first best"
    return _waiting(conn, ev, (variant_id, None), rule, reason, [])


def _await_best(
    conn: sqlite3.Connection, ev: ResultEvaluated, camp: sqlite3.Row, variant_id: str, best_id: str
) -> Outbox:
    """The best has no value on this tier yet (a promotion): run it there and wait."""
    requests = replicates(conn, camp, best_id, ev.tier, 1, ev.ts)
    if not requests:
        return []  # its run there is still out
    rule = keep.rule_for(camp["keep_rule"])[0]
    reason = f"waiting for the best's run on {ev.tier}"
    return _waiting(conn, ev, (variant_id, best_id), rule, reason, requests)


def _waiting(
    conn: sqlite3.Connection,
    ev: ResultEvaluated,
    sides: tuple[str, str | None],
    rule: str,
    reason: str,
    requests: list[RunRequested],
) -> Outbox:
    """An `undecided` before the rule can compare (no best value yet), recorded."""
    variant_id, best_id = sides
    ok = ok_values(conn, variant_id, ev.tier)
    waiting = keep.Verdict(
        decision="undecided",
        rule=rule,
        n_candidate=len(ok),
        n_best=0,
        mean_candidate=keep.mean(ok),
        mean_best=None,
        noise=None,
        margin=None,
        reason=reason,
    )
    decided = _decided_event(ev, variant_id, best_id, waiting, len(requests))
    _record(conn, ev, decided)
    return [decided, *requests]


def _give_up(verdict: keep.Verdict) -> keep.Verdict:
    return dataclasses.replace(
        verdict,
        decision="discard",
        reason="replicates failed: no further evidence",
        want_candidate=0,
        want_best=0,
    )


def _decided_event(
    ev: ResultEvaluated,
    variant_id: str,
    best_id: str | None,
    v: keep.Verdict,
    requested: int,
    cancels: list[RunCancel] | None = None,
) -> VariantDecided:
    return VariantDecided(
        campaign=ev.campaign,
        event_id=contracts.event_id_for(
            "decided", ev.campaign, variant_id, ev.tier, v.decision, v.n_candidate, v.n_best
        ),
        ts=ev.ts,
        variant_id=variant_id,
        decision=v.decision,
        rule=v.rule,
        tier=ev.tier,
        reason=v.reason,
        n_candidate=v.n_candidate,
        n_best=v.n_best,
        mean_candidate=v.mean_candidate,
        mean_best=v.mean_best,
        best_variant_id=best_id,
        noise=v.noise,
        margin=v.margin,
        replicates_requested=requested,
        cancelled_runs=[c.run_id for c in cancels or []],
    )


def _record(conn: sqlite3.Connection, ev: ResultEvaluated, d: VariantDecided) -> None:
    """The decision in keep_decisions, and on the variant (`keep` stays `keep` in history)."""
    conn.execute(
        "UPDATE variants SET verdict = :decision, "
        "status = CASE WHEN :decision = 'undecided' OR status = 'keep' THEN status "
        "ELSE :decision END, decided_at = :ts WHERE variant_id = :variant_id",
        {"decision": d.decision, "ts": d.ts, "variant_id": d.variant_id},
    )
    conn.execute(
        "INSERT OR REPLACE INTO keep_decisions(event_id, campaign, variant_id, run_id, status, "
        "value, runs, rule, best_before_variant_id, best_before_value, best_before_runs, tier, "
        "noise, margin, reason, replicates_requested, runs_cancelled, decided_at) VALUES "
        "(:event_id, :campaign, :variant_id, :run_id, :decision, :mean_candidate, "
        ":n_candidate, :rule, :best_variant_id, :mean_best, :n_best, :tier, :noise, :margin, "
        ":reason, :replicates_requested, :runs_cancelled, :ts)",
        msgspec.structs.asdict(d) | {"run_id": ev.run_id, "runs_cancelled": len(d.cancelled_runs)},
    )


def _keep(
    conn: sqlite3.Connection,
    ev: ResultEvaluated,
    variant_id: str,
    v: keep.Verdict,
    camp: sqlite3.Row,
) -> BestUpdated:
    """Make the variant the campaign's best; the BestUpdated to publish."""
    value, best_id = v.mean_candidate or 0.0, camp["best_variant_id"]
    conn.execute(
        "UPDATE campaigns SET best_variant_id = ?, best_value = ?, best_runs = ? WHERE name = ?",
        (variant_id, value, v.n_candidate, ev.campaign),
    )
    conn.execute(
        "INSERT INTO best_history(campaign, variant_id, value, previous_variant_id, "
        "previous_value, ts) VALUES (?, ?, ?, ?, ?, ?)",
        (ev.campaign, variant_id, value, best_id, camp["best_value"], ev.ts),
    )
    digest = conn.execute(
        "SELECT source_digest FROM variants WHERE variant_id = ?", (variant_id,)
    ).fetchone()["source_digest"]
    return BestUpdated(
        campaign=ev.campaign,
        event_id=contracts.event_id_for("best", ev.campaign, variant_id),
        ts=ev.ts,
        variant_id=variant_id,
        source_digest=digest or "",
        value=value,
        runs=v.n_candidate,
        previous_variant_id=best_id,
        previous_value=v.mean_best if best_id else None,
        previous_runs=v.n_best,
        rule=v.rule,
        tier=ev.tier,
        noise=v.noise,
        margin=v.margin,
    )
