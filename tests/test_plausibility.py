"""Results that cannot be real: a forged summary block is `implausible`, never `ok`.

The first test is the finding of issue 12: a train.py that printed a block with
`val_bpb: 0.0001` after 1.5 s without training was recorded ok (and became the best).
It runs as a real subprocess on the local backend, and the evaluator reads its real log.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.contracts import RunFinished
from services.evaluator.classify import evaluate_run
from services.launcher.backend import RunOutcome
from services.launcher.local import LocalBackend
from services.launcher.sim import SimBackend, SimParams
from tests.launcher_helpers import finished_from, job

FORGED_TRAIN = """
import time
time.sleep(1.5)  # no training at all
print("---")
print("val_bpb:          0.000100")
print("training_seconds: 300.1")
print("total_seconds:    325.9")
print("total_tokens_M:   499.6")
print("num_steps:        953")
"""


async def test_a_forged_block_from_a_real_run_is_implausible(tmp_path: Path) -> None:
    (tmp_path / "harness").mkdir()
    backend = LocalBackend(tmp_path / "runs")
    outcome = await backend.run(
        job(FORGED_TRAIN, "v-default-0", harness_dir=tmp_path / "harness", timeout_s=30.0),
        lambda _: None,
    )
    assert outcome.exit_code == 0
    log = outcome.read_log()
    evaluation = evaluate_run(finished_from(outcome, "v-default-0", log), log, "val_bpb")
    assert evaluation.status == "implausible"
    assert evaluation.value is None
    assert "training_seconds 300.1" in evaluation.crash_reason
    assert "launcher measured the whole run" in evaluation.crash_reason


SHORT_TRAIN = """
import time
time.sleep(0.6)
print("---")
print("val_bpb:          0.900000")
print("training_seconds: 0.5")
print("total_seconds:    0.6")
print("total_tokens_M:   0.1")
print("num_steps:        10")
"""


async def test_a_local_run_far_below_its_harness_budget_is_implausible(tmp_path: Path) -> None:
    """The budget a local run is held to is the harness's (prepare.py's PROFILES), never
    what the run itself prints."""
    harness = tmp_path / "harness"
    harness.mkdir()
    (harness / "prepare.py").write_text(
        'PROFILES = {"cpu": {"time_budget": 20, "eval_tokens": 128 * 256}}\n'
    )
    backend = LocalBackend(tmp_path / "runs")
    outcome = await backend.run(
        job(SHORT_TRAIN, "v-default-0", harness_dir=harness, timeout_s=30.0), lambda _: None
    )
    assert outcome.exit_code == 0 and outcome.budget_s == 20.0
    log = outcome.read_log()
    evaluation = evaluate_run(finished_from(outcome, "v-default-0", log), log, "val_bpb")
    assert evaluation.status == "implausible", evaluation
    assert "far below the budget of 20s" in evaluation.crash_reason


async def test_the_sim_backend_is_plausible_on_its_own_clock() -> None:
    params = SimParams(sim_budget_s=300.0, sim_time_scale=0.5 / 300.0, sim_failure_rate=0.0)
    backend = SimBackend(params)
    outcome = await backend.run(job("DEPTH = 8\n", "v-default-0"), lambda _: None)
    log = outcome.read_log()
    evaluation = evaluate_run(finished_from(outcome, "v-default-0", log), log, "val_bpb")
    assert evaluation.status == "ok", evaluation.crash_reason


def block(**values: float) -> str:
    return "---\n" + "".join(f"{k}: {v}\n" for k, v in values.items())


def wall_clock_run(**fields: float) -> RunFinished:
    """A run the launcher measured at 330 s (and `fields`: its clock scale, its budget)."""
    outcome = RunOutcome(0, 100.0, 430.0, **fields)  # type: ignore[arg-type]
    return finished_from(outcome, "v-default-0")


@pytest.mark.parametrize(
    ("fields", "log", "reason"),
    [
        ({}, block(val_bpb=0.99, training_seconds=500.0), "launcher measured the whole run"),
        (
            {"budget_s": 300.0},
            block(val_bpb=0.99, training_seconds=12.0),
            "far below the budget of 300s",
        ),
        ({}, block(val_bpb=0.99, training_seconds=300.0, num_steps=0), "no training step"),
        ({}, block(val_bpb=0.99, total_tokens_M=0.0), "no training token"),
        (
            {},
            block(val_bpb=0.99, total_tokens_M=0.0001, num_steps=953),
            "less than one token a step",
        ),
        (
            {},
            block(val_bpb=0.99, training_seconds=0.5, total_tokens_M=5e6),
            "beyond any accelerator",
        ),
        ({}, block(val_bpb=0.99, training_seconds=300.0, total_seconds=100.0), "> total_seconds"),
        (
            {"clock_scale": 2.0},  # 330 wall seconds are 165 s of the trainer's clock
            block(val_bpb=0.99, training_seconds=300.0),
            "launcher measured the whole run at 165.0s",
        ),
    ],
    ids=[
        "longer-than-wall",
        "below-budget",
        "no-steps",
        "no-tokens",
        "tokens",
        "rate",
        "total",
        "scaled",
    ],
)
def test_implausible_blocks(fields: dict[str, float], log: str, reason: str) -> None:
    evaluation = evaluate_run(wall_clock_run(**fields), log, "val_bpb")
    assert evaluation.status == "implausible", evaluation
    assert reason in evaluation.crash_reason
    assert evaluation.value is None


def test_an_honest_block_within_budget_and_wall_is_ok() -> None:
    event = wall_clock_run(budget_s=300.0)
    log = block(val_bpb=0.99, training_seconds=300.1, total_tokens_M=499.6, num_steps=953)
    assert evaluate_run(event, log, "val_bpb").status == "ok"
