"""The sim backend: sleeps instead of training; its logs parse like real ones."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from services.contracts import parse_progress, parse_summary
from services.evaluator.classify import evaluate_run
from services.launcher import landscape as ls
from services.launcher.backend import Job, RunOutcome
from services.launcher.sim import SimBackend, SimParams
from tests.launcher_helpers import finished_from
from tests.launcher_helpers import job as make_job

SEED = (
    "DEPTH = 8\nDEVICE_BATCH_SIZE = 128\nMATRIX_LR = 0.04\nWEIGHT_DECAY = 0.2\n"
    "WARMUP_RATIO = 0.0\nprint('training')\n"
)


def job(source: str, run_id: str = "v-default-0", **kw: object) -> Job:
    return make_job(source, run_id, **({"reference_source": SEED} | kw))


def backend(slots: int = 4, **params: float) -> SimBackend:
    """A sim backend with the tests' defaults; params are SimParams fields without `sim_`."""
    fields: dict[str, float] = {"budget_s": 300.0, "time_scale": 0.001} | params
    prefixed = {f"sim_{name}": value for name, value in fields.items()}
    return SimBackend(msgspec.convert(prefixed, SimParams), slots=slots)


def evaluate(outcome: RunOutcome) -> tuple[str, float | None, str]:
    finished = finished_from(outcome, log_tail=outcome.log_text)
    ev = evaluate_run(finished, outcome.read_log())
    return ev.status, ev.value, ev.crash_reason


async def test_a_sim_run_prints_progress_and_a_summary_block() -> None:
    lines: list[str] = []
    sim = backend(noise=7e-4)
    t0 = time.monotonic()
    outcome = await sim.run(job(SEED), lines.append)
    assert 0.25 < time.monotonic() - t0 < 2.0  # (300 + 25) simulated seconds x 0.001
    assert outcome.exit_code == 0 and sim.name == "sim"
    progress = [p for p in map(parse_progress, lines) if p is not None]
    assert len(progress) == 5 and progress[-1].fraction == 1.0
    assert progress[0].train_loss > progress[-1].train_loss
    block = parse_summary(outcome.log_text)
    assert block is not None and set(block) >= {"val_bpb", "training_seconds", "num_steps"}
    status, value, _ = evaluate(outcome)
    truth = ls.Landscape(SEED).true_val_bpb(SEED)
    assert status == "ok" and value == pytest.approx(truth, abs=5e-3)
    assert f"val_bpb:          {value:.6f}" in outcome.log_text
    again = await sim.run(job(SEED), lambda _: None)
    assert parse_summary(again.log_text) == block  # the noise is seeded by the run id


async def test_failures_look_like_real_ones() -> None:
    sim = backend(failure_rate=1.0)
    cases = {
        "oom": ls.set_constants(SEED, {"DEVICE_BATCH_SIZE": 2**17}),
        "diverged": ls.set_constants(SEED, {"MATRIX_LR": 40.0}),
        "crash": SEED + "def broken(:\n",
    }
    for expected, source in cases.items():
        outcome = await sim.run(job(source), lambda _: None)
        status, value, reason = evaluate(outcome)
        assert (status, value, outcome.exit_code) == (expected, None, 1), outcome.log_text
        if expected == "oom":
            assert "torch.OutOfMemoryError: CUDA out of memory" in outcome.log_text
        if expected == "diverged":
            assert outcome.log_text.splitlines()[-1] == "FAIL"
        if expected == "crash":
            assert reason.startswith("SyntaxError")
    # A knob outside its domain fails as the trainer's assertion does, whatever the rate.
    outcome = await backend(failure_rate=0.0).run(
        job(ls.set_constants(SEED, {"DEVICE_BATCH_SIZE": 100})), lambda _: None
    )
    status, value, reason = evaluate(outcome)
    assert (status, value, outcome.exit_code) == ("crash", None, 1), outcome.log_text
    assert "AssertionError: DEVICE_BATCH_SIZE = 100 is outside its domain" in outcome.log_text


async def test_a_run_past_its_timeout_times_out() -> None:
    outcome = await backend().run(job(SEED, timeout_s=100.0), lambda _: None)
    assert outcome.timed_out and outcome.exit_code is None
    assert evaluate(outcome)[0] == "timeout"


async def test_cancel_stops_a_sim_run() -> None:
    sim = backend(time_scale=1.0)
    task = asyncio.create_task(sim.run(job(SEED), lambda _: None))
    await asyncio.sleep(0.05)
    await sim.cancel("v-default-0", "early stop")
    outcome = await asyncio.wait_for(task, 2.0)
    assert outcome.cancelled
    assert evaluate(outcome)[2] == "cancelled: early stop"


async def test_hundreds_of_slots_fit_on_two_cores() -> None:
    sim = backend(slots=256, time_scale=0.002)
    variants = [
        ls.set_constants(SEED, {"DEPTH": 6 + i % 5, "MATRIX_LR": 0.02 + 0.001 * i})
        for i in range(256)
    ]
    t0 = time.monotonic()
    outcomes = await asyncio.gather(
        *(sim.run(job(v, f"v{i}-default-0"), lambda _: None) for i, v in enumerate(variants))
    )
    assert time.monotonic() - t0 < 5.0
    assert sum(o.exit_code == 0 for o in outcomes) == 256
