"""The grid strategy and the constants it edits, on a toy train.py and a local bowl."""

from __future__ import annotations

import ast
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.bench_search import knob_head
from services.contracts import variant_id_for
from services.proposer.constants import find_constants, format_value, rewrite
from services.proposer.grid import GridStrategy, parse_title, tunable
from services.proposer.strategy import Proposal, ProposalRequest, ResultRow, StrategyExhausted

SEED = '''"""A toy train.py."""
import math

DEPTH = 8  # number of layers
MATRIX_LR = 0.04  # Muon lr
TOTAL_BATCH_SIZE = 2**19  # tokens per step
WARMUP_RATIO = 0.0
ADAM_BETA2 = 0.95
BIAS = -1.0
USE_FLAG = True
WINDOW = "SSSL"
SEED = 42


def main() -> None:
    LATE = 3
    print(DEPTH * MATRIX_LR, LATE)

AFTER_DEF = 5
'''

OPTIMUM = {
    "DEPTH": 12,
    "MATRIX_LR": 0.07,
    "TOTAL_BATCH_SIZE": 2**18,
    "WARMUP_RATIO": 0.05,
    "ADAM_BETA2": 0.95,
    "BIAS": -1.0,
}


def bowl(source: str) -> float:
    """A separable bowl with one interaction, minimum 1.0 at OPTIMUM."""
    values = {c.name: c.value for c in find_constants(source)}
    z = {}
    for name, opt in OPTIMUM.items():
        v = values[name]
        z[name] = math.log(v / opt) if v > 0 and opt > 0 else 10 * (v - opt)
    total = sum(d * d for d in z.values()) + 0.5 * z["DEPTH"] * z["MATRIX_LR"]
    return 1.0 + 0.01 * total


def request(parent_source: str = SEED, **kw: object) -> ProposalRequest:
    args: dict[str, object] = {
        "campaign": "c",
        "parent_id": variant_id_for("c", parent_source),
        "parent_source": parent_source,
        "best_value": None,
        "results": [],
        "in_flight_titles": [],
        "known_ids": set(),
        "k": 100,
        "wave": 1,
    }
    args.update(kw)
    return ProposalRequest(**args)  # type: ignore[arg-type]


def test_constants_found_with_exact_spans_and_rewritten_in_place() -> None:
    consts = {c.name: c for c in find_constants(SEED)}
    assert list(consts) == [
        "DEPTH",
        "MATRIX_LR",
        "TOTAL_BATCH_SIZE",
        "WARMUP_RATIO",
        "ADAM_BETA2",
        "BIAS",
        "SEED",
    ]
    assert consts["TOTAL_BATCH_SIZE"].value == 2**19 and consts["TOTAL_BATCH_SIZE"].text == "2**19"
    assert consts["BIAS"].value == -1.0 and consts["BIAS"].text == "-1.0"
    new = rewrite(SEED, {"MATRIX_LR": "0.08", "TOTAL_BATCH_SIZE": "2**20"})
    assert "MATRIX_LR = 0.08  # Muon lr\n" in new
    assert "TOTAL_BATCH_SIZE = 2**20  # tokens per step\n" in new
    assert new.replace("0.08", "0.04").replace("2**20", "2**19") == SEED
    assert format_value(consts["TOTAL_BATCH_SIZE"], 2**18) == "2**18"
    assert format_value(consts["MATRIX_LR"], 0.0280000001) == "0.028"
    assert format_value(consts["DEPTH"], 11) == "11"
    twice = "A_LR = 0.1\nA_LR = 0.2\nB_LR = 0.3  # é\n"
    assert [c.name for c in find_constants(twice)] == ["B_LR"]  # ambiguous ones left out
    assert rewrite(twice, {"B_LR": "0.6"}).endswith("B_LR = 0.6  # é\n")


def test_profile_override_pairs_keep_the_live_constant() -> None:
    src = "DEPTH = 8\nCPU_DEPTH = 3\nMATRIX_LR = 0.04\nSEED = 1\n"
    consts = find_constants(src)
    assert [c.name for c in tunable(consts, "cpu")] == ["CPU_DEPTH", "MATRIX_LR"]
    assert [c.name for c in tunable(consts, "gpu")] == ["DEPTH", "MATRIX_LR"]


def test_first_wave_is_one_factor_coarse_then_fine() -> None:
    planned = GridStrategy().plan(request())
    # Two-factor screening points come only after every one-factor move.
    kinds = [" + " in p.title for p in planned]
    assert kinds == sorted(kinds)
    proposals = [p for p in planned if " + " not in p.title]
    titles = [p.title for p in proposals]
    coarse = {
        "DEPTH 8 -> 4",
        "DEPTH 8 -> 16",
        "MATRIX_LR 0.04 -> 0.02",
        "MATRIX_LR 0.04 -> 0.08",
        "TOTAL_BATCH_SIZE 2**19 -> 2**18",
        "TOTAL_BATCH_SIZE 2**19 -> 2**20",
        "WARMUP_RATIO 0.0 -> 0.2",
        "ADAM_BETA2 0.95 -> 0.975",
        "ADAM_BETA2 0.95 -> 0.9",
        "BIAS -1.0 -> -1.5",
        "BIAS -1.0 -> -0.5",
    }
    assert set(titles[: len(coarse)]) == coarse
    fine = set(titles[len(coarse) :])
    assert {
        "DEPTH 8 -> 6",
        "DEPTH 8 -> 11",
        "MATRIX_LR 0.04 -> 0.028",
        "MATRIX_LR 0.04 -> 0.056",
        "WARMUP_RATIO 0.0 -> 0.1",
    } <= fine
    assert not any(
        "SEED" in t or "USE_FLAG" in t or "AFTER_DEF" in t or "LATE" in t for t in titles
    )
    assert not any(t.startswith("TOTAL_BATCH_SIZE") for t in fine)  # powers of two only
    for p in proposals:
        ast.parse(p.source)
        moves = parse_title(p.title)
        assert moves is not None and len(moves) == 1
        assert p.parent_id == request().parent_id and p.rationale
    assert len({p.source for p in proposals}) == len(proposals)
    # Deterministic given the request; k limits the wave.
    again = GridStrategy().plan(request(k=5))
    assert [p.title for p in again] == titles[:5]


def drive(
    strategy: GridStrategy,
    seed: str,
    score: Callable[[str], float],
    n: int,
    k: int,
    noise: float = 0.0,
    rng_seed: int = 0,
) -> tuple[str, list[Proposal]]:
    """A synchronous campaign: waves of k, strict keep on the observed value."""
    rng = random.Random(rng_seed)
    seed_id = variant_id_for("c", seed)
    best_id, best_src, best_val = seed_id, seed, score(seed) + rng.gauss(0, noise)
    rows = [ResultRow(seed_id, "baseline", "ok", best_val)]
    known = {seed_id}
    proposed: list[Proposal] = []
    wave = 1
    while len(proposed) < n:
        req = request(
            best_src,
            parent_id=best_id,
            best_value=best_val,
            results=list(rows),
            known_ids=set(known),
            k=min(k, n - len(proposed)),
            wave=wave,
            noise_floor=max(noise, 1e-6),
        )
        try:
            batch = strategy.plan(req)
        except StrategyExhausted:
            break  # a minimum of the grid: every neighbour has been tried
        for p in batch:
            vid = variant_id_for("c", p.source)
            assert vid not in known, f"re-proposed {p.title}"
            known.add(vid)
            value = score(p.source) + rng.gauss(0, noise)
            rows.append(ResultRow(vid, p.title, "ok", value, parent_id=p.parent_id))
            if value < best_val:
                best_id, best_src, best_val = vid, p.source, value
        proposed += batch
        wave += 1
    return best_src, proposed


def test_factorial_combinations_follow_winners() -> None:
    parent_id = variant_id_for("c", SEED)
    base = bowl(SEED)
    first = GridStrategy().plan(request(k=100))
    by_title = {p.title: p for p in first}
    rows = [ResultRow(parent_id, "baseline", "ok", base)]
    for p in first:
        rows.append(
            ResultRow(
                variant_id_for("c", p.source), p.title, "ok", bowl(p.source), parent_id=parent_id
            )
        )
    winners = sorted(
        (r for r in rows[1:] if base - (r.value or 0) > 1e-4), key=lambda r: r.value or 0
    )
    assert len(winners) >= 3
    best = winners[0]
    best_src = by_title[best.title].source
    req = request(
        best_src,
        parent_id=best.variant_id,
        best_value=best.value,
        results=rows,
        known_ids={r.variant_id for r in rows},
        k=6,
        wave=2,
        noise_floor=1e-4,
    )
    combos = GridStrategy().plan(req)
    assert parse_title(combos[0].title) is not None
    assert len(parse_title(combos[0].title) or ()) >= 2  # a 2x2x2 point first
    # Every combination is built from winners (transplanted onto the new best).
    winner_moves = {m for r in winners for m in parse_title(r.title) or ()}
    combo_moves = [m for p in combos for m in parse_title(p.title) or () if "+" in p.title]
    assert combo_moves and set(combo_moves) <= winner_moves
    assert all(bowl(p.source) < bowl(best_src) for p in combos[:2])


def test_never_repeats_and_exhausts_when_nothing_is_in_flight() -> None:
    src = "X_LR = 0.1\nN_LAYER = 1\n"
    strategy = GridStrategy()
    known = {variant_id_for("c", src)}
    titles = []
    while True:
        req = request(src, known_ids=set(known), k=3)
        try:
            batch = strategy.plan(req)
        except StrategyExhausted as exc:
            assert "every grid point" in str(exc)
            break
        assert batch
        for p in batch:
            vid = variant_id_for("c", p.source)
            assert vid not in known
            known.add(vid)
            titles.append(p.title)
    # N_LAYER = 1 can only go up; ints stay >= 1 and different from the original.
    assert sorted(titles) == sorted(
        [
            "X_LR 0.1 -> 0.05",
            "X_LR 0.1 -> 0.2",
            "X_LR 0.1 -> 0.07",
            "X_LR 0.1 -> 0.14",
            "X_LR 0.1 -> 0.085",
            "X_LR 0.1 -> 0.118",
            "X_LR 0.1 -> 0.092",  # the refinement's smallest steps
            "X_LR 0.1 -> 0.109",
            "N_LAYER 1 -> 2",
            "N_LAYER 1 -> 2 + X_LR 0.1 -> 0.05",
            "N_LAYER 1 -> 2 + X_LR 0.1 -> 0.2",
        ]
    )
    # Something still in flight: "try later", not exhausted.
    assert strategy.plan(request(src, known_ids=known, in_flight_titles=["X_LR 0.1 -> 0.2"])) == []


def test_grid_descends_a_bowl() -> None:
    best, proposed = drive(GridStrategy(), SEED, bowl, n=60, k=4)
    assert len(proposed) > 20
    assert bowl(SEED) - bowl(best) > 0.5 * (bowl(SEED) - 1.0)


def test_grid_beats_the_seed_on_the_sim_landscape() -> None:
    landscape_mod = pytest.importorskip("services.launcher.landscape")
    seed = (Path(__file__).resolve().parents[1] / "trainer" / "train.py").read_text()
    noise = 7e-4
    for sim_seed in (0, 1):
        landscape = landscape_mod.Landscape(seed, seed=sim_seed)

        def truth(source: str, landscape: Any = landscape) -> float:
            # The landscape reads only module-level constants and the grid edits only those
            # before the first def: scoring the head alone is exact and 10x faster.
            return float(landscape.true_val_bpb(knob_head(source)))

        assert truth(seed) == landscape.true_val_bpb(seed)
        best, _ = drive(
            GridStrategy(profile="gpu"), seed, truth, n=60, k=4, noise=noise, rng_seed=sim_seed
        )
        gained = truth(seed) - truth(best)
        assert gained > noise, f"sim seed {sim_seed}: gained only {gained:.5f}"


def test_a_thousand_slot_fleet_gets_a_first_wave_of_wider_screens() -> None:
    """Before any result the list holds some 400 points of the seed; a fleet of 1,024
    slots (plus its look-ahead) asks for 1,280: 2x2 screens of finer steps and 2x2x2
    screens fill it, every one distinct and valid. A small fleet never sees them."""
    seed = (Path(__file__).resolve().parents[1] / "trainer" / "train.py").read_text()
    wave = GridStrategy("cpu").plan(request(seed, k=1280))
    ids = {variant_id_for("c", p.source) for p in wave}
    assert len(wave) == len(ids) == 1280
    assert max(len(parse_title(p.title) or ()) for p in wave) == 3
    assert all(p.title.count("+") == len(parse_title(p.title) or ()) - 1 for p in wave)
    small = GridStrategy("cpu").plan(request(seed, k=200))
    assert len(small) == 200 and max(p.title.count("+") for p in small) <= 1
    assert [p.title for p in small] == [p.title for p in wave[:200]]


def test_a_fleet_wider_than_every_list_gets_random_points_and_never_runs_dry() -> None:
    """Past the wide screens (some 5,900 points of the seed) come random points of 2 to 4
    knobs at steps of any level: a 4,096-slot fleet's second wave, with the first one's
    8,000 variants known, still gets as many new, distinct and valid variants as it asks."""
    seed = (Path(__file__).resolve().parents[1] / "trainer" / "train.py").read_text()
    grid = GridStrategy("cpu")
    first = grid.plan(request(seed, k=8000))
    known = {variant_id_for("c", p.source) for p in first}
    assert len(first) == len(known) == 8000
    assert any(p.rationale.startswith("random point") for p in first)
    second = grid.plan(request(seed, k=4096, known_ids=known))
    ids = {variant_id_for("c", p.source) for p in second}
    assert len(second) == len(ids) == 4096 and not ids & known
    sizes = {len(parse_title(p.title) or ()) for p in second}
    assert sizes <= {2, 3, 4} and 4 in sizes
    for p in second[::64]:  # each is a valid edit of the seed: it parses, it names its moves
        ast.parse(p.source)
        for move in parse_title(p.title) or ():
            assert f"{move.name} = {move.new}" in p.source
    # The draws are the request's own: planned again, the same wave.
    assert [p.title for p in GridStrategy("cpu").plan(request(seed, k=4096, known_ids=known))] == [
        p.title for p in second
    ]
