"""A user's own training script: another edited file, another metric, maximized, run by the
local backend as real subprocesses."""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.broker import EmbeddedNats
from services.bus import Bus
from services.campaign import start_campaign
from services.contracts import BestUpdated, ResultEvaluated, VariantProposed
from services.supervisor import wait_until_consumed
from tests.e2e_helpers import history, ledger_rows, services_running, sim_settings

SCORE_PY = '''\
"""A toy "training" whose accuracy peaks at LR = 0.2 and WIDTH = 16."""
import math
import time

LR = 0.1
WIDTH = 8

time.sleep(0.15)  # trains for the training_seconds it reports (the evaluator checks)

accuracy = 0.9 - 0.5 * math.log(LR / 0.2) ** 2 - 0.05 * math.log2(WIDTH / 16) ** 2
print("step 00001 (100.0%) | loss: 1.000000 | lrm: 1.00 | dt: 1ms | tok/sec: 1,000 | x")
print("---")
print(f"accuracy:         {accuracy:.6f}")
print("training_seconds: 0.1")
'''


async def test_own_script_other_metric_maximized(
    tmp_path: Path, nats_server: EmbeddedNats, bus: Bus
) -> None:
    trainer = tmp_path / "mytrainer"
    trainer.mkdir()
    (trainer / "score.py").write_text(SCORE_PY)
    (trainer / "README.txt").write_text("shipped with every run\n")
    settings = sim_settings(
        tmp_path / "home",
        nats_server.url,
        backend="local",
        slots=2,
        campaign="own",
        trainer_dir=str(trainer),
        edit_file="score.py",
        metric="accuracy",
        direction="maximize",
        max_experiments=8,
        run_timeout_s=30.0,
        keep_rule="strict",  # the best is the maximum over single runs
        noise_runs=1,
    )
    async with services_running(settings, nats_server.url):
        await start_campaign(bus, settings)
        db = settings.ledger_path

        async def completed() -> None:
            while ledger_rows(db, "SELECT status FROM campaigns WHERE name='own'") != [
                ("completed",)
            ]:
                await asyncio.sleep(0.3)

        await asyncio.wait_for(completed(), 120)
        await wait_until_consumed(bus, "ledger")

    results = [e for e in await history(bus, [ResultEvaluated]) if isinstance(e, ResultEvaluated)]
    proposed = [e for e in await history(bus, [VariantProposed]) if isinstance(e, VariantProposed)]
    assert len({r.variant_id for r in results}) == 8 == len(proposed)
    assert all(r.status == "ok" and r.metric == "accuracy" for r in results), results
    values = {r.variant_id: r.value for r in results if r.value is not None}
    best = [e for e in await history(bus, [BestUpdated]) if isinstance(e, BestUpdated)][-1]
    assert best.variant_id == max(values, key=lambda v: values[v])  # maximized
    assert best.value > values[proposed[0].variant_id]  # beat the baseline
    # The run directory held the harness files beside the edited script.
    run_dirs = list((tmp_path / "home" / "runs" / "own").iterdir())
    assert all((d / "README.txt").exists() and (d / "score.py").exists() for d in run_dirs)
