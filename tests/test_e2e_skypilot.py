"""The whole system on the skypilot backend over the fake pool: two tiers (13 + 3 clusters,
or in pool mode two pools of 13 + 3 workers), a real nats-server, the four services,
SQLite; a failed launch (or pool apply), a preemption and an API server outage along the
way. Nothing may be lost, and no infrastructure failure may be charged to a variant."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import yaml

from services.broker import EmbeddedNats
from services.bus import Bus
from services.campaign import start_campaign
from services.contracts import ResultEvaluated, RunFinished, RunStarted, VariantProposed
from services.launcher import factory
from services.launcher.skypilot_adapter import LaunchFailed
from services.launcher.skypilot_fake import FakeSky
from services.launcher.skypilot_fake_pool import FakePool
from services.ledger import queries
from services.ledger.db import open_read
from services.settings import SkyTier
from services.supervisor import wait_until_consumed
from tests.e2e_helpers import history, services_running, sim_settings
from tests.eventually import eventually
from tests.skypilot_helpers import PREPARE, PREPARE_CHECK, TEMPLATE

TRAIN = """\
import time
import prepare_check
time.sleep(0.3)
LR = 0.03
WARMUP = 0.1
WD = 0.01
BETA = 0.9
print("step 00010 (100.0%) | loss: 3.000000 | lrm: 1.00 | dt: 1ms | tok/sec: 1,000 | x")
print("---")
print(f"val_bpb:          {1.0 + (LR - 0.02) ** 2 * 100 + (WARMUP - 0.2) ** 2:.6f}")
print("training_seconds: 0.1")
"""
TIERS = [
    SkyTier(name="screen", accelerator="H100:1", clusters=13, usd_per_gpu_hour=2.4),
    SkyTier(name="validate", accelerator="H200:1", clusters=3, usd_per_gpu_hour=3.6),
]
EXPERIMENTS = {"screen": 39, "validate": 9}


@pytest.fixture
async def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeSky]:
    sky = FakeSky(tmp_path / "clusters", time_scale=0.002)  # published latencies / 500
    monkeypatch.setattr(factory, "_sky", [sky])
    monkeypatch.setattr(factory, "_pool", [FakePool(sky)])
    yield sky
    await sky.close()


async def _disturb(fake: FakeSky) -> None:
    """A preemption once runs are going, then the API server away for a moment."""

    def busy_screen_cluster() -> str | None:
        names = [n for n, c in fake.clusters_by_name.items() if c.running and "screen" in n]
        return names[0] if fake.calls["exec"] >= 8 and names else None

    await eventually(busy_screen_cluster, 60, "a screen cluster running a job", interval=0.02)
    victim = busy_screen_cluster()
    assert victim is not None
    await fake.preempt(victim)
    await asyncio.sleep(0.5)
    fake.api_down = True
    await asyncio.sleep(0.3)
    fake.api_down = False


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["clusters", "pool"])
async def test_two_tier_campaign_on_the_fake_pool(
    tmp_path: Path, nats_server: EmbeddedNats, bus: Bus, fake: FakeSky, mode: str
) -> None:
    trainer = tmp_path / "trainer"
    trainer.mkdir()
    for name, text in (
        ("train.py", TRAIN),
        ("prepare.py", PREPARE),
        ("prepare_check.py", PREPARE_CHECK),
    ):
        (trainer / name).write_text(text)
    template = tmp_path / "task.yaml"
    template.write_text(yaml.safe_dump(TEMPLATE))
    url = nats_server.url
    screen = sim_settings(
        tmp_path, url, backend="skypilot", tier="screen", campaign="screen",
        launcher_tiers="screen,validate",  # one launcher process serves both tiers
        trainer_dir=str(trainer), max_experiments=EXPERIMENTS["screen"],
        skypilot_tiers=[msgspec.structs.replace(t, mode=mode) for t in TIERS],
        skypilot_template=str(template), strategy="grid",
    )  # fmt: skip
    validate = msgspec.structs.replace(
        screen, tier="validate", campaign="validate", max_experiments=EXPERIMENTS["validate"]
    )
    fake.fail_next(
        "launch" if mode == "clusters" else "pool_apply",
        LaunchFailed("CommandError: setup failed with exit 1 (injected)"),
    )
    async with services_running(screen, url):
        disturb = asyncio.create_task(_disturb(fake))
        try:
            # The disturbances come early in the screen campaign, the validate one after.
            await start_campaign(bus, screen)
            await asyncio.wait_for(asyncio.shield(disturb), 60)
            await start_campaign(bus, validate)

            def completed() -> bool:
                with contextlib.closing(open_read(screen.ledger_path)) as conn:
                    return all(
                        (queries.campaign(conn, name) or {}).get("status") == "completed"
                        for name in EXPERIMENTS
                    )

            await eventually(completed, 80, "both campaigns completed", interval=0.3)
            await wait_until_consumed(bus, "ledger")
        finally:
            disturb.cancel()

    proposed = [e for e in await history(bus, [VariantProposed]) if isinstance(e, VariantProposed)]
    finished = [e for e in await history(bus, [RunFinished]) if isinstance(e, RunFinished)]
    started = [e for e in await history(bus, [RunStarted]) if isinstance(e, RunStarted)]
    results = [e for e in await history(bus, [ResultEvaluated]) if isinstance(e, ResultEvaluated)]
    infra = [f for f in finished if f.infra_failure]
    assert infra, "the injected setup failure, preemption and outage must show as infra failures"
    with contextlib.closing(open_read(screen.ledger_path)) as conn:
        for name, count in EXPERIMENTS.items():
            variants = queries.list_variants(conn, name, limit=1000)
            ids = {v["variant_id"] for v in variants}
            assert ids == {p.variant_id for p in proposed if p.campaign == name}
            final = {
                r["variant_id"]: r["status"]
                for r in conn.execute(
                    "SELECT variant_id, status FROM results WHERE campaign = ?", (name,)
                )
            }
            # Nothing lost: every proposal has a result; none is an infrastructure failure.
            assert 0 < len(ids) <= count and set(final) == ids, name  # the grid may run dry
            assert "infra" not in final.values(), name
            # The trainer never crashes: a crash would be an infra failure charged to a variant.
            assert all(v["status"] in ("keep", "discard") for v in variants), name
            summary = queries.campaign_summary(conn, name)
            assert summary is not None and summary["gpu"]["usd"] > 0
    # Every run that failed on the infrastructure ran again and got a real result.
    retried = {f.run_id for f in infra}
    assert retried <= {r.run_id for r in results if r.status != "infra"}
    # One run at a time per cluster GPU; each cluster prepared once per launch.
    assert all(c.max_running <= 1 for c in fake.clusters_by_name.values())
    assert all(
        c.setups == int((c.workdir / "prepared.count").read_text())
        for c in fake.clusters_by_name.values()
    )
    # Each tier's runs went to its own clusters: 13 + 3 at most, named by tier.
    on_cluster = {
        run_dir.name: run_dir.parents[2].name
        for run_dir in (tmp_path / "clusters").glob("*/sky_workdir/runs/*")
    }
    for f in finished:
        if f.run_id in on_cluster:
            assert on_cluster[f.run_id].startswith(f"ns-{f.tier}-"), (
                f.run_id,
                on_cluster[f.run_id],
            )
    assert {c.rsplit("-", 1)[0] for c in on_cluster.values()} == {"ns-screen", "ns-validate"}
    assert len(set(on_cluster.values())) <= 16
    # RunStarted names where the run really went: its cluster (clusters), its pool (pool).
    hosts: dict[str, set[str]] = {}
    for s in started:
        hosts.setdefault(s.run_id, set()).add(s.host)
    for run_id, cluster in on_cluster.items():
        where = cluster if mode == "clusters" else cluster.rsplit("-", 1)[0]
        assert where in hosts[run_id], (run_id, cluster, hosts[run_id])
    if mode == "pool":  # the preemption was SkyPilot's to recover, not ours to retry
        pool = factory._pool[0]
        assert isinstance(pool, FakePool)
        assert any(j.recovery_count for j in pool.jobs.values())
