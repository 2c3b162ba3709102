"""`nightshift bench fleet` end to end on a small fleet: separate processes, two launchers
splitting the slots through the tier's one shared consumer, every figure in the report."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from services.bench import bench_settings, fleet_bench
from services.bench_processes import Topology


async def test_two_launchers_share_the_tiers_work_and_the_report_is_complete(
    tmp_path: Path,
) -> None:
    keep = tmp_path / "bench"
    report = await fleet_bench(
        4, experiments=12, run_seconds=0.5, topology=Topology(launchers=2, keep_dir=str(keep))
    )
    assert report.experiments >= 12 and report.launchers == 2 and report.proposers == 1
    # Both launcher processes ran work from the one durable `launcher-default`.
    assert {"launcher-0", "launcher-1", "ledger", "proposer", "nats-server"} <= set(
        report.peak_rss_mb
    )
    with sqlite3.connect(keep / "ledger.db") as conn:
        hosts = {host for (host,) in conn.execute("SELECT DISTINCT host FROM runs")}
    assert hosts == {"sim-bench-0", "sim-bench-1"}
    assert report.time_to_full_s is not None and report.time_to_full_s >= 0
    assert report.proposals_per_s > 0 and report.run_starts_per_s > 0
    assert report.ledger_live_events_per_s > 0 and report.ledger_replay_events_per_s > 0
    assert 0 < report.utilization <= 1 and 0 < report.utilization_while_queued <= 1
    assert (keep / "samples.tsv").read_text().startswith("time\twork_queued\twork_in_hand")


def test_the_strict_bench_runs_one_run_per_variant(tmp_path: Path) -> None:
    strict = bench_settings(tmp_path, "nats://x", 16, 96, 2.0, keep_rule="strict")
    default = bench_settings(tmp_path, "nats://x", 16, 96, 2.0)
    assert (strict.keep_rule, strict.noise_runs) == ("strict", 1)
    assert (default.keep_rule, default.noise_runs) == ("noise-aware", 3)
