"""`nightshift bench decisions`: how honest the keep decisions are, on the sim where the
truth is known (`true_val_bpb(source)` of the landscape).

Each configuration runs the whole system (real nats-server, the four services in this
process) for the same GPU budget: the same number of runs (simulated runs all last about
as long), replicates included. Per seed and configuration, from the ledger:

- false_keep_rate: keeps whose true value is not better than that of the best replaced;
- missed_win_rate: discarded candidates whose true value beat the best's by more than
  the simulated noise;
- final_true_val_bpb: the true value of the final best;
- replicate_fraction: the share of runs that were replicates or promotions (runs beyond a
  variant's first on the first tier; the seed's included);
- cancelled_fraction: runs the ledger cancelled (a decision made them useless) per run of
  the budget; one cancelled before it started cost nothing and is not among the runs, one
  stopped mid-run counts as a whole run there;
- worst_false_keep: of the false keeps, the largest true value kept minus true value
  replaced (a near tie, or a real loss against the noise);
- time_to_target_ratio: (a)'s wall time to reach the true value (a) ends with, divided by
  this configuration's, each from its first run's start (0 when it does not reach it; None when (a) never improved on the
  seed). For this figure a fleet runs on past the equal budget, up to twice (a)'s GPU time
  (twice the runs); every other figure stops at the budget.

The configurations: (a) `sequential_strict`, autoresearch's way (1 slot, strict); (b)
`strict` (16 slots, strict); (c) `noise_aware` (16 slots, noise-aware with replicates);
`tiered`: noise-aware on 12 `screen` slots promoting to 4 `validate` slots (9% faster).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import msgspec

from services.bench import REPO, bench_settings
from services.broker import EmbeddedNats
from services.bus import Bus, Delivery, Handlers
from services.campaign import start_campaign, stop_campaign
from services.contracts import CampaignStopped, ResultEvaluated
from services.launcher.landscape import true_val_bpb
from services.settings import Settings
from services.supervisor import run_services, wait_until_consumed

# name -> (slots, keep_rule, noise_runs, validate slots): with validate slots, the slots
# are those of the `screen` tier and a second launcher serves `validate` (9% faster).
CONFIGS: dict[str, tuple[int, str, int, int]] = {
    "sequential_strict": (1, "strict", 1, 0),
    "strict": (16, "strict", 1, 0),
    "noise_aware": (16, "noise-aware", 3, 0),
    "tiered": (12, "noise-aware", 3, 4),
}
VALIDATE_SPEED = 1.09


@dataclass
class DecisionFigures:
    false_keep_rate: float
    missed_win_rate: float
    final_true_val_bpb: float
    replicate_fraction: float
    time_to_target_ratio: float | None
    cancelled_fraction: float = 0.0
    # The largest (true value kept - true value replaced) of a false keep, 0 without one:
    # a near tie or a real loss, against the simulated noise.
    worst_false_keep: float = 0.0


@dataclass
class CampaignTruth:
    """What one campaign did, read from its ledger and judged with the landscape."""

    keeps: int
    false_keeps: list[float]  # true value kept - true value replaced, of each false keep
    discards: int
    missed_wins: int
    final_true: float
    runs: int
    replicates: int
    cancelled: int  # runs the ledger cancelled by the budget's last result
    t0: float  # the first run's start
    reached: list[tuple[float, float]]  # (ts, true value of the new best), in order


async def _run_campaign(settings: Settings, url: str, budget: int, validate_slots: int) -> None:
    """Run the campaign until `budget` runs have a result, then stop it and drain."""
    stop = asyncio.Event()
    buses, tasks = await run_services(settings, url, stop)
    if validate_slots:
        second = msgspec.structs.replace(
            settings,
            tier="validate",
            launcher_id="validate",
            slots=validate_slots,
            sim_speed=VALIDATE_SPEED,
        )
        more_buses, more_tasks = await run_services(second, url, stop, ["launcher"])
        buses, tasks = buses + more_buses, tasks + more_tasks
    bus = await Bus.from_settings(settings, "bench")
    done = asyncio.Event()
    count = [0]

    async def on_result(event: ResultEvaluated, _: Delivery) -> None:
        if event.campaign == settings.campaign and event.status != "infra":
            count[0] += 1
            if count[0] >= budget:
                done.set()

    async def on_stopped(event: CampaignStopped, _: Delivery) -> None:
        if event.campaign == settings.campaign:
            done.set()  # the strategy ran out of ideas before the budget

    follow_stop = asyncio.Event()
    handlers: Handlers = {ResultEvaluated: on_result, CampaignStopped: on_stopped}
    follower = asyncio.create_task(bus.follow(handlers, stop=follow_stop))
    try:
        await start_campaign(bus, settings)
        await done.wait()
        await stop_campaign(bus, settings.campaign, "completed", "bench budget reached")
        await wait_until_consumed(bus, "ledger", timeout_s=120)
    finally:
        follow_stop.set()
        stop.set()
        await follower
        await asyncio.wait(tasks, timeout=30)
        for b in (bus, *buses):
            await b.close()


def read_truth(db: Path, campaign: str, budget: int, noise: float, sim_seed: int) -> CampaignTruth:
    """Judge the campaign's decisions (up to its budget-th result) with the landscape."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        seed_text = (REPO / "trainer" / "train.py").read_text()
        sources = {
            r["variant_id"]: r["text"]
            for r in conn.execute(
                "SELECT v.variant_id, s.text FROM variants v JOIN sources s "
                "ON s.digest = v.source_digest WHERE v.campaign = ?",
                (campaign,),
            )
        }
        truth = {v: true_val_bpb(text, seed_text, sim_seed) for v, text in sources.items()}
        config = json.loads(
            conn.execute("SELECT config FROM campaigns WHERE name = ?", (campaign,)).fetchone()[0]
        )
        first_tier = (config.get("tiers") or ["default"])[0]
        results = conn.execute(
            "SELECT replica, tier, evaluated_at FROM results WHERE campaign = ? "
            "AND status != 'infra' ORDER BY seq LIMIT ?",
            (campaign, budget),
        ).fetchall()
        cut = results[-1]["evaluated_at"]
        every_best = conn.execute(
            "SELECT variant_id, previous_variant_id, ts FROM best_history WHERE campaign = ? "
            "ORDER BY id",
            (campaign,),
        ).fetchall()
        bests = [b for b in every_best if b["ts"] <= cut]
        final = _final_decisions(conn, campaign, cut)
        # From the first run's start, not its result: a fleet whose first results already
        # reach the target would otherwise divide by almost nothing.
        started = conn.execute(
            "SELECT MIN(started_at) FROM runs WHERE campaign = ?", (campaign,)
        ).fetchone()[0]
        cancelled = conn.execute(
            "SELECT COUNT(*) FROM runs WHERE campaign = ? AND cancel_requested_at <= ?",
            (campaign, cut),
        ).fetchone()[0]
    finally:
        conn.close()
    replaced = [b for b in bests if b["previous_variant_id"] in truth]
    discards = [d for d in final if d[0] in truth and d[1] in truth]
    return CampaignTruth(
        keeps=len(replaced),
        false_keeps=[
            truth[b["variant_id"]] - truth[b["previous_variant_id"]]
            for b in replaced
            if truth[b["variant_id"]] >= truth[b["previous_variant_id"]]
        ],
        discards=len(discards),
        missed_wins=sum(truth[best] - truth[v] > noise for v, best in discards),
        final_true=truth[bests[-1]["variant_id"]] if bests else true_val_bpb(seed_text),
        runs=len(results),
        replicates=sum(r["replica"] > 0 or r["tier"] != first_tier for r in results),
        cancelled=int(cancelled),
        t0=float(started),
        # beyond the budget too: a fleet may run on to twice (a)'s GPU time to reach its level
        reached=[(b["ts"], truth[b["variant_id"]]) for b in every_best if b["variant_id"] in truth],
    )


def _final_decisions(conn: sqlite3.Connection, campaign: str, cut: float) -> list[tuple[str, str]]:
    """(variant, best it was compared with) of each variant whose last decision by `cut`
    is a discard."""
    last: dict[str, tuple[str, str | None]] = {}
    for r in conn.execute(
        "SELECT variant_id, status, best_before_variant_id FROM keep_decisions "
        "WHERE campaign = ? AND decided_at <= ? ORDER BY decided_at, rowid",
        (campaign, cut),
    ):
        last[r["variant_id"]] = (r["status"], r["best_before_variant_id"])
    return [(v, best) for v, (status, best) in last.items() if status == "discard" and best]


def _time_to(truth: CampaignTruth, target: float) -> float | None:
    for ts, value in truth.reached:
        if value <= target + 1e-12:
            return ts - truth.t0
    return None


def figures(runs: list[CampaignTruth], baseline: list[CampaignTruth]) -> DecisionFigures:
    """Means over the seeds; `baseline` is (a)'s campaigns, seed by seed."""
    ratios: list[float] = []
    for mine, theirs in zip(runs, baseline, strict=True):
        target = theirs.final_true
        t_a, t_c = _time_to(theirs, target), _time_to(mine, target)
        if t_a is not None and theirs.keeps:
            ratios.append(t_a / t_c if t_c else 0.0)
    return DecisionFigures(
        false_keep_rate=round(_rate([(len(r.false_keeps), r.keeps) for r in runs]), 4),
        missed_win_rate=round(_rate([(r.missed_wins, r.discards) for r in runs]), 4),
        final_true_val_bpb=round(statistics.fmean(r.final_true for r in runs), 6),
        replicate_fraction=round(_rate([(r.replicates, r.runs) for r in runs]), 4),
        time_to_target_ratio=round(statistics.fmean(ratios), 2) if ratios else None,
        cancelled_fraction=round(_rate([(r.cancelled, r.runs) for r in runs]), 4),
        worst_false_keep=round(max((g for r in runs for g in r.false_keeps), default=0.0), 6),
    )


def _rate(pairs: list[tuple[int, int]]) -> float:
    """Pooled over the seeds: sum of events over sum of chances (0 without chances)."""
    chances = sum(n for _, n in pairs)
    return sum(k for k, _ in pairs) / chances if chances else 0.0


async def decisions_bench(
    seeds: int = 3, budget: int = 96, noise: float = 0.003, run_seconds: float = 0.25
) -> dict[str, DecisionFigures]:
    """Every configuration on every seed at `budget` runs; the figures per configuration."""
    found: dict[str, list[CampaignTruth]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="nightshift-decisions-") as tmp:
        for seed in range(seeds):
            for name, (slots, rule, noise_runs, validate_slots) in CONFIGS.items():
                home = Path(tmp) / f"{name}-{seed}"
                server = EmbeddedNats(home / "nats").start()
                try:
                    settings = msgspec.structs.replace(
                        bench_settings(home, server.url, slots, 0, run_seconds),
                        campaign=f"{name.replace('_', '-')}-{seed}",
                        keep_rule=rule,
                        noise_runs=noise_runs,
                        sim_noise=noise,
                        sim_seed=seed,
                        noise_floor=0.0,
                        tiers="screen,validate" if validate_slots else "",
                        tier="screen" if validate_slots else "default",
                        launcher_id="screen" if validate_slots else "",
                    )
                    # A fleet runs on past the equal budget, to twice (a)'s GPU time, for
                    # the time to reach (a)'s level; the other figures stop at the budget.
                    runs = budget if slots == 1 else 2 * budget
                    await _run_campaign(settings, server.url, runs, validate_slots)
                finally:
                    server.stop()
                truth = read_truth(settings.ledger_path, settings.campaign, budget, noise, seed)
                found[name].append(truth)
    baseline = found["sequential_strict"]
    return {name: figures(runs, baseline) for name, runs in found.items()}


def print_decisions(report: dict[str, DecisionFigures], as_json: bool = False) -> None:
    if as_json:
        print(json.dumps({name: asdict(f) for name, f in report.items()}))
        return
    print(
        f"{'configuration':<18} {'false keeps':>11} {'missed wins':>11} {'final true':>11} "
        f"{'replicates':>10} {'cancelled':>9} {'time to target':>14} {'worst false keep':>16}"
    )
    for name, f in report.items():
        ratio = "-" if f.time_to_target_ratio is None else f"x{f.time_to_target_ratio:.2f}"
        print(
            f"{name:<18} {f.false_keep_rate:>11.3f} {f.missed_win_rate:>11.3f} "
            f"{f.final_true_val_bpb:>11.6f} {f.replicate_fraction:>10.3f} "
            f"{f.cancelled_fraction:>9.3f} {ratio:>14} {f.worst_false_keep:>16.6f}"
        )
