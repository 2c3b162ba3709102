"""`nightshift bench search`: search strategies side by side on the sim landscape.

Each strategy runs a campaign against the landscape in this process, with the semantics
of the real system but none of its messaging: a fleet of `slots` simulated runs (each
lasting the sim backend's simulated seconds, failures shorter), variants in flight kept at
slots + look-ahead (the proposer's automatic look-ahead), the strategy asked for as many
as that leaves after every result, results in the order runs end, and the strict rule's
kept best (lower single run). The seed itself runs first, as the proposer's baseline.
Through NATS a 400-experiment campaign takes minutes; here hundreds take seconds, so
several seeds and four strategies fit in a run.

Measured per checkpoint (experiments evaluated): the true (noiseless) val_bpb of the kept
best, mean and spread (standard deviation) over the seeds; per seed, the best reachable
value (landscape.reachable_val_bpb) and the share of the seed-to-reachable gap the grid
closed after the last checkpoint.
"""

from __future__ import annotations

import heapq
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.contracts import variant_id_for
from services.launcher import landscape as ls
from services.launcher.sim import simulated_seconds
from services.proposer.grid import GridStrategy
from services.proposer.strategy import Proposal, ProposalRequest, ResultRow

CHECKPOINTS = (16, 32, 64, 128, 256, 400)
STRATEGIES = ("grid", "random", "tpe", "cmaes")
CAMPAIGN = "bench-search"
BUDGET_S = 300.0


class Searcher(Protocol):
    """A strategy as the bench drives it: plan a wave, hear each result."""

    def plan(self, request: ProposalRequest) -> list[Proposal]: ...

    def tell(self, variant_id: str, source: str, value: float | None) -> None: ...


class GridSearcher:
    """The proposer's grid strategy, unchanged (it reads results from the request)."""

    def __init__(self, profile: str) -> None:
        self.grid = GridStrategy(profile=profile)

    def plan(self, request: ProposalRequest) -> list[Proposal]:
        return self.grid.plan(request)

    def tell(self, variant_id: str, source: str, value: float | None) -> None:
        pass


@dataclass
class Campaign:
    """One strategy's campaign on one landscape; trajectory[n-1]: the true value of the
    kept best after n results."""

    landscape: ls.Landscape
    seed_source: str
    slots: int
    experiments: int
    noise: float
    failure_rate: float
    sim_seed: int
    sources: dict[str, str] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)
    parents: dict[str, str | None] = field(default_factory=dict)
    rows: list[ResultRow] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)
    running: list[tuple[float, int, str]] = field(default_factory=list)
    observed: dict[str, ls.SimObservation] = field(default_factory=dict)
    best: tuple[str, float] | None = None
    trajectory: list[float] = field(default_factory=list)
    now: float = 0.0

    @property
    def in_flight(self) -> int:
        return len(self.queued) + len(self.running)

    def add(self, source: str, title: str, parent_id: str | None) -> str | None:
        variant_id = variant_id_for(CAMPAIGN, source)
        if variant_id in self.sources or len(self.sources) >= self.experiments:
            return None
        self.sources[variant_id], self.titles[variant_id] = source, title
        self.parents[variant_id] = parent_id
        self.queued.append(variant_id)
        return variant_id

    def request(self, k: int) -> ProposalRequest:
        parent_id = self.best[0] if self.best else variant_id_for(CAMPAIGN, self.seed_source)
        return ProposalRequest(
            campaign=CAMPAIGN,
            parent_id=parent_id,
            parent_source=self.sources.get(parent_id, self.seed_source),
            best_value=self.best[1] if self.best else None,
            results=list(self.rows),
            in_flight_titles=[self.titles[v] for v in self.queued + [r[2] for r in self.running]],
            known_ids=set(self.sources),
            k=k,
            wave=len(self.rows),
            noise_floor=self.noise,
        )

    def start_runs(self) -> None:
        while self.queued and len(self.running) < self.slots:
            variant_id = self.queued.pop(0)
            obs = self.observed[variant_id] = self.observe(variant_id)
            seconds = simulated_seconds(obs, BUDGET_S, f"{self.sim_seed}:{variant_id}")
            heapq.heappush(self.running, (self.now + seconds, len(self.sources), variant_id))

    def observe(self, variant_id: str) -> ls.SimObservation:
        key = f"{self.sim_seed}:{variant_id}-default-0"
        return self.landscape.observe(self.sources[variant_id], key, self.noise, self.failure_rate)

    def finish_one(self, searcher: Searcher) -> None:
        """The next run to end: its result, the strict rule's decision, the trajectory."""
        self.now, _, variant_id = heapq.heappop(self.running)
        obs = self.observed.pop(variant_id)
        value = obs.val_bpb
        status = obs.failure or "ok"
        self.rows.append(
            ResultRow(
                variant_id=variant_id,
                title=self.titles[variant_id],
                status=status,
                value=value,
                parent_id=self.parents[variant_id],
                finished_at=self.now,
            )
        )
        searcher.tell(variant_id, self.sources[variant_id], value)
        if value is not None and (self.best is None or value < self.best[1]):
            self.best = (variant_id, value)
        kept = self.sources[self.best[0]] if self.best else self.seed_source
        self.trajectory.append(self.landscape.true_val_bpb(kept))


def run_campaign(campaign: Campaign, searcher: Searcher, lookahead: int) -> list[float]:
    """Drive one campaign to its experiment count (or until the strategy has no idea)."""
    campaign.add(campaign.seed_source, "baseline", None)
    while len(campaign.rows) < campaign.experiments:
        want = min(
            campaign.slots + lookahead - campaign.in_flight,
            campaign.experiments - len(campaign.sources),
        )
        if want > 0:
            for proposal in searcher.plan(campaign.request(want))[:want]:
                campaign.add(proposal.source, proposal.title, proposal.parent_id)
        campaign.start_runs()
        if not campaign.running:
            break  # nothing in flight and nothing new: the strategy is exhausted
        campaign.finish_one(searcher)
    return campaign.trajectory


def knob_head(source: str) -> str:
    """The lines before the first top-level def or class: all the knobs, and all the
    landscape reads (the strategies edit only these; parsing 700 lines per proposal would
    dominate the bench)."""
    lines = source.splitlines(keepends=True)
    end = next(
        (i for i, line in enumerate(lines) if line.startswith(("def ", "class ", "@"))), len(lines)
    )
    return "".join(lines[:end])


@dataclass
class Checkpoint:
    experiments: int
    mean: float
    spread: float  # standard deviation over the seeds


@dataclass
class SearchReport:
    profile: str
    slots: int
    experiments: int
    seeds: list[int]
    seed_value: float
    reachable: float  # mean over the seeds
    reachable_per_seed: list[float]
    curves: dict[str, list[Checkpoint]]
    grid_gap_closed: list[float]  # per seed, at the last checkpoint
    grid_ahead: dict[str, list[int]]  # other strategy -> per checkpoint, seeds the grid led
    wall_s: dict[str, float]

    @property
    def grid_gap_closed_min(self) -> float:
        return min(self.grid_gap_closed, default=0.0)


SearcherFactory = Callable[[ls.Landscape, str, int], Searcher]


def searcher_factories(profile: str) -> dict[str, SearcherFactory]:
    from services.bench_samplers import optuna_searcher, random_searcher

    return {
        "grid": lambda _scape, _seed_src, _s: GridSearcher(profile),
        "random": random_searcher,
        "tpe": lambda scape, src, s: optuna_searcher(scape, src, s, "tpe"),
        "cmaes": lambda scape, src, s: optuna_searcher(scape, src, s, "cmaes"),
    }


def parse_seeds(text: str) -> list[int]:
    """`1-5` or `1,4,7` (or both: `1-3,9`); ValueError naming the flag when malformed."""
    seeds: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            low, _, high = part.partition("-")
            seeds += list(range(int(low), int(high or low) + 1))
    except ValueError:
        raise ValueError(f"--seeds takes e.g. 1-10 or 1,4,7, not {text!r}") from None
    if not seeds:
        raise ValueError(f"--seeds names no seed: {text!r}")
    return seeds


def search_bench(
    seeds: Sequence[int] = (1, 2, 3, 4, 5),
    strategies: Sequence[str] = STRATEGIES,
    experiments: int = 400,
    slots: int = 16,
    profile: str = "cpu",
    noise: float = 7e-4,
    failure_rate: float = 0.5,
    reference: str | None = None,
) -> SearchReport:
    if experiments < 1 or slots < 1 or not seeds:
        raise ValueError("bench search needs experiments >= 1, slots >= 1 and a seed")
    seed_source = knob_head(reference if reference is not None else ls.default_reference())
    factories = searcher_factories(profile)
    lookahead = max(2, -(-slots // 4))  # the proposer's automatic look-ahead
    marks = [c for c in CHECKPOINTS if c < experiments] + [experiments]
    finals: dict[str, list[list[float]]] = {name: [] for name in strategies}
    wall: dict[str, float] = dict.fromkeys(strategies, 0.0)
    reachable: list[float] = []
    seed_value = 0.0
    for sim_seed in seeds:
        scape = ls.Landscape(seed_source, seed=sim_seed, profile=profile)
        seed_value = scape.true_val_bpb(seed_source)
        reachable.append(scape.reachable_val_bpb())
        for name in strategies:
            started = time.perf_counter()
            camp = Campaign(scape, seed_source, slots, experiments, noise, failure_rate, sim_seed)
            trajectory = run_campaign(
                camp, factories[name](scape, seed_source, sim_seed), lookahead
            )
            wall[name] += time.perf_counter() - started
            padded = trajectory + [trajectory[-1]] * (experiments - len(trajectory))
            finals[name].append([padded[m - 1] for m in marks])
    curves, closed, ahead = _compare(finals, marks, seed_value, reachable)
    return SearchReport(
        profile,
        slots,
        experiments,
        list(seeds),
        seed_value,
        statistics.fmean(reachable),
        reachable,
        curves,
        closed,
        ahead,
        wall,
    )


def _compare(
    finals: dict[str, list[list[float]]],
    marks: list[int],
    seed_value: float,
    reachable: list[float],
) -> tuple[dict[str, list[Checkpoint]], list[float], dict[str, list[int]]]:
    """Per strategy the checkpoints over the seeds; per seed the share of the gap the grid
    closed; per other strategy and checkpoint the seeds the grid led."""
    curves = {
        name: [
            Checkpoint(m, statistics.fmean(col), statistics.pstdev(col))
            for m, col in zip(marks, zip(*runs, strict=True), strict=True)
        ]
        for name, runs in finals.items()
    }
    grid_runs = finals.get("grid", [])
    closed = [
        (seed_value - run[-1]) / (seed_value - reach) if seed_value > reach else 1.0
        for run, reach in zip(grid_runs, reachable, strict=False)
    ]
    ahead = {
        name: [
            sum(g[i] < o[i] for g, o in zip(grid_runs, runs, strict=True))
            for i in range(len(marks))
        ]
        for name, runs in finals.items()
        if name != "grid" and grid_runs
    }
    return curves, closed, ahead


def report_json(report: SearchReport) -> dict[str, object]:
    out: dict[str, object] = {
        name: [{"experiments": c.experiments, "mean": c.mean, "spread": c.spread} for c in curve]
        for name, curve in report.curves.items()
    }
    out.update(
        seed_value=report.seed_value,
        reachable=report.reachable,
        reachable_per_seed=report.reachable_per_seed,
        grid_gap_closed=report.grid_gap_closed,
        grid_gap_closed_min=report.grid_gap_closed_min,
        grid_ahead=report.grid_ahead,
        seeds=report.seeds,
        slots=report.slots,
        profile=report.profile,
        wall_s=report.wall_s,
    )
    return out


def print_search_report(report: SearchReport, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(report_json(report)))
        return
    names = list(report.curves)
    print(
        f"search on the sim ({report.profile} profile, {report.slots} slots, seeds "
        f"{report.seeds}): true val_bpb of the kept best, mean ± spread over the seeds\n"
        f"  seed {report.seed_value:.4f}, best reachable {report.reachable:.4f} (mean; per "
        f"seed {', '.join(f'{r:.4f}' for r in report.reachable_per_seed)})"
    )
    print("  experiments " + "".join(f"{n:>18}" for n in names))
    for row in zip(*(report.curves[n] for n in names), strict=True):
        cells = "".join(f"{c.mean:>11.4f} ± {c.spread:.4f}" for c in row)
        print(f"  {row[0].experiments:>11} {cells}")
    if report.grid_gap_closed:
        shares = ", ".join(f"{g * 100:.0f}%" for g in report.grid_gap_closed)
        print(
            f"  grid: share of the seed-to-reachable gap closed at {report.experiments}: "
            f"{shares} (min {report.grid_gap_closed_min * 100:.0f}%)"
        )
    for name, counts in report.grid_ahead.items():
        print(
            f"  grid ahead of {name} (seeds of {len(report.seeds)}, per checkpoint): "
            + ", ".join(str(c) for c in counts)
        )
    print("  wall seconds: " + ", ".join(f"{n} {s:.1f}" for n, s in report.wall_s.items()))
