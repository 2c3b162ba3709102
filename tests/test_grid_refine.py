"""The grid's refinement phase, its failed moves, and `nightshift bench search`."""

from __future__ import annotations

import json
import math

import pytest

from services.cli import main
from services.contracts import variant_id_for
from services.proposer.grid import GridStrategy, parse_title
from services.proposer.refine import Sample, minimum_of
from services.proposer.strategy import ProposalRequest, ResultRow

PARENT = "X_LR = 0.1\nY_LR = 0.5\nDEPTH = 4\n"
OPTIMUM = {"X_LR": 0.13, "Y_LR": 0.5 * 0.8, "DEPTH": 4.0}


def bowl(values: dict[str, float]) -> float:
    return 1.0 + 0.01 * sum(math.log(values[n] / o) ** 2 for n, o in OPTIMUM.items())


def screened_request(failed: str = "", flat: bool = False) -> ProposalRequest:
    """The parent with every one-factor screen (coarse to finer) run on a bowl (or on a
    flat landscape, where every move is neutral)."""
    grid = GridStrategy()
    parent_id = variant_id_for("c", PARENT)
    first = grid.plan(
        ProposalRequest("c", parent_id, PARENT, None, [], [], {parent_id}, 100, 1, noise_floor=1.0)
    )
    singles = [p for p in first if " + " not in p.title and "0.092" not in p.title]
    base = {"X_LR": 0.1, "Y_LR": 0.5, "DEPTH": 4.0}
    rows = [ResultRow(parent_id, "baseline", "ok", bowl(base))]
    for p in singles:
        (move,) = parse_title(p.title) or ()
        value = {**base, move.name: float(move.new)}
        status = "crash" if p.title == failed else "ok"
        rows.append(
            ResultRow(
                variant_id_for("c", p.source),
                p.title,
                status,
                (bowl(base) if flat else bowl(value)) if status == "ok" else None,
                parent_id=parent_id,
            )
        )
    known = {r.variant_id for r in rows}
    # A noise floor above every gain: no winner, so no factorial combination comes first.
    return ProposalRequest(
        "c", parent_id, PARENT, bowl(base), rows, [], known, 12, 2, noise_floor=1.0
    )


def test_a_parabola_finds_the_bottom_of_a_knob() -> None:
    samples = [Sample(d, (d - 0.3) ** 2 - 0.09 + 0.001) for d in (-0.7, -0.36, 0.33, 0.69)]
    found = minimum_of("X_LR", samples)
    assert found is not None and found.offset == pytest.approx(0.3, abs=1e-6)
    assert found.predicted_gain == pytest.approx(0.09, abs=1e-6)
    flat = [Sample(d, -d) for d in (-0.7, -0.36, 0.33, 0.69)]
    assert minimum_of("X_LR", flat) is None  # no bowl, no refinement point
    assert minimum_of("X_LR", samples[:3]) is None  # too few points to trust


def test_after_the_screens_proposals_move_by_smaller_steps_around_the_best() -> None:
    request = screened_request()
    planned = GridStrategy().plan(request)
    assert planned and all("refinement" in p.rationale for p in planned[:4])
    coarse = math.log(2)
    for p in planned[:8]:
        for move in parse_title(p.title) or ():
            step = abs(math.log(float(move.new) / float(move.old)))
            assert 0 < step < coarse, p.title  # smaller than the coarse screens
    # The first point is the fitted minimum: X_LR near 0.13 and Y_LR near 0.4 at once.
    moves = {m.name: float(m.new) for m in parse_title(planned[0].title) or ()}
    assert moves["X_LR"] == pytest.approx(OPTIMUM["X_LR"], rel=0.05)
    assert moves["Y_LR"] == pytest.approx(OPTIMUM["Y_LR"], rel=0.05)
    assert bowl({"DEPTH": 4.0, "X_LR": 0.1, "Y_LR": 0.5, **moves}) < request.best_value  # type: ignore[operator]


def test_a_failed_move_is_never_combined_again() -> None:
    request = screened_request(failed="X_LR 0.1 -> 0.2", flat=True)
    request.k = 400
    planned = GridStrategy().plan(request)
    screens = [p.title for p in planned if "screening" in p.rationale]
    assert len(screens) >= 4, "neutral moves are screened in pairs once all else is run"
    assert any("X_LR 0.1 -> 0.05" in title for title in screens)
    assert not any("X_LR 0.1 -> 0.2" in p.title for p in planned)


def test_bench_search_prints_the_checkpoints_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    strategies = "grid,random,tpe,cmaes"
    try:
        import optuna  # noqa: F401
    except ImportError:
        strategies = "grid,random"  # Optuna is a dev dependency
    argv = ["bench", "search", "--seeds", "1-2", "--experiments", "40", "--json"]
    assert main([*argv, "--strategies", strategies]) == 0
    report = json.loads(capsys.readouterr().out)
    for name in strategies.split(","):
        assert [c["experiments"] for c in report[name]] == [16, 32, 40]
        assert all(c["spread"] >= 0 for c in report[name])
    grid = report["grid"]
    assert grid[-1]["mean"] < report["seed_value"]  # the grid beats the seed within 40
    assert report["reachable"] < grid[-1]["mean"]
    assert 0 < report["grid_gap_closed_min"] < 1 and len(report["grid_gap_closed"]) == 2
    assert main(["bench", "search", "--strategies", "grid,nope"]) == 2
