"""The fleet benchmark's figures, as pure functions of what it observed.

A span is one run on one slot: (slot, started_at, finished_at), wall-clock seconds from the
run's RunFinished. Each function here is unit-tested on hand-made spans and samples
(tests/test_bench_stats.py); the benchmark only collects and calls them.
"""

from __future__ import annotations

import itertools
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence

Slot = tuple[str, int]
Span = tuple[Slot, float, float]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def busy_fraction(spans: Iterable[tuple[float, float]], slots: int, t0: float, t1: float) -> float:
    """Share of slots x [t0, t1] spent inside runs."""
    if t1 <= t0:
        return 0.0
    busy = sum(max(0.0, min(e, t1) - max(s, t0)) for s, e in spans)
    return busy / (slots * (t1 - t0))


def overheads(spans: Iterable[Span]) -> list[float]:
    """Per slot, seconds from a run's end to the next run's start on that slot."""
    by_slot: dict[Slot, list[tuple[float, float]]] = {}
    for slot, start, end in spans:
        by_slot.setdefault(slot, []).append((start, end))
    gaps: list[float] = []
    for runs in by_slot.values():
        runs.sort()
        gaps.extend(max(0.0, nxt[0] - prev[1]) for prev, nxt in itertools.pairwise(runs))
    return gaps


def time_to_full(spans: Iterable[tuple[float, float]], slots: int, t0: float) -> float | None:
    """Seconds from `t0` (the campaign's start) until every slot is busy at once; None if
    the fleet was never full. A run ending at the instant another starts frees its slot first."""
    edges = sorted(
        itertools.chain.from_iterable(((s, 1), (e, -1)) for s, e in spans),
        key=lambda edge: (edge[0], edge[1]),
    )
    busy = 0
    for at, change in edges:
        busy += change
        if busy >= slots:
            return max(0.0, at - t0)
    return None


def rate_of_first(times: Iterable[float], count: int) -> float:
    """Events per second over the first `count` of `times` (from the first to the count-th);
    0 when fewer than two events or no time passed between them."""
    first = sorted(times)[: max(0, count)]
    if len(first) < 2 or first[-1] <= first[0]:
        return 0.0
    return (len(first) - 1) / (first[-1] - first[0])


def sampled_rate(samples: Sequence[tuple[float, int]]) -> float:
    """Per second, from (time, cumulative count) samples: the count's growth between the first
    sample where it had grown and the last one where it was still growing."""
    moving = [(t, n) for t, n in samples if n > 0]
    if len(moving) < 2:
        return 0.0
    last_n = moving[-1][1]
    end = next(t for t, n in moving if n == last_n)  # the first time it reached its last value
    start_t, start_n = moving[0]
    if end <= start_t:
        return 0.0
    return (last_n - start_n) / (end - start_t)


_VM_HWM = re.compile(r"^VmHWM:\s+(\d+)\s+kB", re.MULTILINE)


def peak_rss_mb(proc_status: str) -> float | None:
    """A process's peak resident memory (VmHWM) in MiB, from the text of /proc/<pid>/status."""
    found = _VM_HWM.search(proc_status)
    return round(int(found.group(1)) / 1024.0, 1) if found else None


def read_peak_rss_mb(pids: Mapping[str, int]) -> dict[str, float]:
    """Each named process's peak resident memory in MiB (those that cannot be read: left out)."""
    peaks: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
                peak = peak_rss_mb(status.read())
        except OSError:
            continue
        if peak is not None:
            peaks[name] = peak
    return peaks


def split_slots(slots: int, launchers: int) -> list[int]:
    """The slots of each of `launchers` launchers: as even as can be, the first ones larger."""
    n = max(1, launchers)
    base, extra = divmod(slots, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def last_queued(samples: Sequence[tuple[float, int, int]]) -> float | None:
    """The last time work waited to be delivered to a launcher, from (time, work not yet
    delivered, work in the launchers' hands) samples. (Work in hand is not counted: it holds
    the runs, the few read ahead, and work naked for a later retry alike.)"""
    waiting = [t for t, pending, _ in samples if pending > 0]
    return max(waiting) if waiting else None
