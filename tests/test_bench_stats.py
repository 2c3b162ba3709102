"""The fleet benchmark's figures, computed from hand-made spans and samples."""

from __future__ import annotations

import pytest

from services.bench import FleetReport, _Observed, _report, _Samples, bench_settings
from services.bench_processes import Topology
from services.bench_stats import (
    busy_fraction,
    last_queued,
    overheads,
    peak_rss_mb,
    rate_of_first,
    read_peak_rss_mb,
    sampled_rate,
    split_slots,
    time_to_full,
)


def test_time_to_full_is_the_first_instant_every_slot_is_busy() -> None:
    # Two slots: the second run starts 3 s after the campaign started (t0 = 100).
    spans = [(101.0, 110.0), (103.0, 112.0), (110.0, 120.0)]
    assert time_to_full(spans, 2, 100.0) == pytest.approx(3.0)


def test_time_to_full_frees_a_slot_before_taking_it_at_the_same_instant() -> None:
    # One slot: a run ends at 5 exactly when the next starts; the fleet is full from 1.
    assert time_to_full([(1.0, 5.0), (5.0, 9.0)], 1, 0.0) == pytest.approx(1.0)
    # Two slots never both busy: runs on one slot back to back, the other never used.
    assert time_to_full([(1.0, 5.0), (5.0, 9.0)], 2, 0.0) is None


def test_rate_of_first_counts_intervals_between_the_first_events() -> None:
    # 11 proposals over 2 s, then a late one that is not part of the first wave.
    times = [10.0 + 0.2 * i for i in range(11)] + [60.0]
    assert rate_of_first(times, 11) == pytest.approx(5.0)
    assert rate_of_first([3.0], 5) == 0.0
    assert rate_of_first([3.0, 3.0], 2) == 0.0


def test_sampled_rate_measures_growth_until_the_count_stops() -> None:
    # (time, ack floor): nothing acked yet, then 100 events/s for 2 s, then idle samples.
    samples = [(0.0, 0), (1.0, 50), (2.0, 150), (3.0, 250), (4.0, 250), (9.0, 250)]
    assert sampled_rate(samples) == pytest.approx(100.0)
    assert sampled_rate([(0.0, 0), (1.0, 7)]) == 0.0


def test_last_queued_is_the_last_sample_with_work_not_yet_delivered() -> None:
    # (time, not yet delivered, in the launchers' hands).
    samples = [(1.0, 3, 4), (2.0, 1, 5), (3.0, 0, 9), (4.0, 0, 2)]
    assert last_queued(samples) == 2.0
    assert last_queued([(1.0, 0, 3)]) is None


def test_peak_rss_is_read_from_vmhwm() -> None:
    status = "Name:\tpython\nVmPeak:\t  900000 kB\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n"
    assert peak_rss_mb(status) == 200.0
    assert peak_rss_mb("Name:\tkthreadd\n") is None


def test_read_peak_rss_reads_this_process_and_skips_a_missing_one() -> None:
    import os

    peaks = read_peak_rss_mb({"me": os.getpid(), "gone": 2**22 + 12345})
    assert set(peaks) == {"me"}
    assert peaks["me"] > 1.0


def test_split_slots_is_as_even_as_can_be() -> None:
    assert split_slots(1024, 3) == [342, 341, 341]
    assert split_slots(16, 1) == [16]
    assert sum(split_slots(4096, 7)) == 4096


def test_topology_starts_one_launcher_per_share_with_its_own_id(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = bench_settings(tmp_path, "nats://x", 1024, 0, 2.0)
    procs = Topology(proposers=2, launchers=3).processes(settings)
    launchers = [(label, s) for label, name, s in procs if name == "launcher"]
    assert [label for label, _ in launchers] == ["launcher-0", "launcher-1", "launcher-2"]
    assert [s.slots for _, s in launchers] == [342, 341, 341]
    assert len({s.launcher_id for _, s in launchers}) == 3
    assert [label for label, name, _ in procs if name == "proposer"] == ["proposer-0", "proposer-1"]


def test_report_computes_each_field_from_what_was_observed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = bench_settings(tmp_path, "nats://x", 2, 4, 10.0)
    observed = _Observed("bench")
    a, b = ("sim-a", 0), ("sim-a", 1)
    # Campaign start at 1000; slot a at 1001-1011 then 1011.5-1021.5; b at 1002-1012, 1012-1022.
    observed.spans = [
        (a, 1001.0, 1011.0),
        (b, 1002.0, 1012.0),
        (a, 1011.5, 1021.5),
        (b, 1012.0, 1022.0),
    ]
    observed.proposed_at = [1000.5, 1000.7, 1010.0]
    observed.results = 4
    samples = _Samples(
        ledger=[(0.0, 0, 3), (1.0, 10, 5), (2.0, 30, 1), (3.0, 30, 0)],
        work=[(1001.0, 2, 2), (1005.0, 1, 3), (1010.0, 0, 2)],  # waiting until 1005
    )
    report = _report(
        observed, settings, Topology(), 40, 20.0, 900.0, samples, {"ledger": 80.0}, 1000.0
    )
    assert isinstance(report, FleetReport)
    assert report.time_to_full_s == pytest.approx(2.0)
    assert report.proposals_per_s == pytest.approx(5.0)  # first two, 0.2 s apart
    assert report.run_starts_per_s == pytest.approx(1.0)  # first two starts, 1 s apart
    assert report.ledger_live_events_per_s == pytest.approx(20.0)
    assert report.ledger_replay_events_per_s == report.events_per_s == 900.0
    assert report.ledger_lag_max == 5
    assert report.live_events_per_s == pytest.approx(2.0)
    assert report.overhead_p50_s == pytest.approx(0.25)
    assert report.peak_rss_mb == {"ledger": 80.0}
    assert report.utilization == pytest.approx(
        busy_fraction([(s, e) for _, s, e in observed.spans], 2, 1001.0, 1012.0), abs=1e-4
    )
    assert sorted(overheads(observed.spans)) == [0.0, 0.5]
    assert report.utilization_while_queued == pytest.approx(
        busy_fraction([(s, e) for _, s, e in observed.spans], 2, 1001.0, 1005.0), abs=1e-4
    )
