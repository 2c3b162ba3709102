"""What the skypilot backend's tests share: a tiny trainer, a test template, a backend on
the fake pool."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.launcher.backend import Backend, Job
from services.launcher.skypilot import SkyPilotBackend
from services.launcher.skypilot_fake import FakeSky
from services.settings import SkyTier
from tests.launcher_helpers import job

# prepare.py counts its runs in the cluster's workdir: setup must run it once per launch.
PREPARE = """\
from pathlib import Path
marker = Path("prepared.count")
marker.write_text(str(int(marker.read_text()) + 1 if marker.exists() else 1))
"""

# train.py with knobs a test sets: what it prints, how long it takes, how it exits.
TRAIN = """\
import sys, time
import prepare_check
LR = 0.03
SLEEP = 0.0
EXIT = 0
print("step 00001 (50.0%) | loss: 4.000000 | lrm: 1.00 | dt: 1ms | tok/sec: 1,000 | x", flush=True)
time.sleep(SLEEP)
print("step 00002 (100.0%) | loss: 3.000000 | lrm: 1.00 | dt: 1ms | tok/sec: 1,000 | x")
if EXIT:
    print("Traceback (most recent call last):\\nRuntimeError: boom")
    sys.exit(EXIT)
print("---")
print(f"val_bpb:          {1.0 + (LR - 0.03) ** 2 * 100:.6f}")
print("training_seconds: 0.1")
"""

# Imported by train.py: the harness is reachable from the run's own directory.
PREPARE_CHECK = "import pathlib\nassert pathlib.Path('../../prepared.count').exists()\n"

TEMPLATE = {
    "resources": {"image_id": "docker:python:3.11-slim"},
    "envs": {"NIGHTSHIFT_CACHE": "/tmp/cache"},
    "setup": "python prepare.py",
}


def source(**knobs: object) -> str:
    text = TRAIN
    for name, value in knobs.items():
        text = "\n".join(
            f"{name} = {value!r}" if line.startswith(f"{name} = ") else line
            for line in text.split("\n")
        )
    return text


def harness(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "prepare.py").write_text(PREPARE)
    (root / "prepare_check.py").write_text(PREPARE_CHECK)
    return root


def tier(
    name: str = "screen", clusters: int = 2, accelerator: str = "H100:1", **kw: Any
) -> SkyTier:
    return SkyTier(
        name=name,
        accelerator=accelerator,
        clusters=clusters,
        infra="k8s/test",
        autostop_minutes=7,
        usd_per_gpu_hour=3.6,
        **kw,
    )


def sky_job(tmp: Path, run_id: str, **kw: Any) -> Job:
    """A run of `source()` (or kw's source) with the test harness under `tmp`."""
    kw.setdefault("harness_dir", harness(tmp / "harness"))
    return job(str(kw.pop("source", source())), run_id, **kw)


def backend(fake: FakeSky, tmp: Path, t: SkyTier, **kw: float) -> SkyPilotBackend:
    return SkyPilotBackend(fake, t, TEMPLATE, tmp / "runs", prefix="t", poll_s=0.01, **kw)


async def cancel_the_caller_mid_run(b: Backend, tmp: Path) -> None:
    """Start a 30 s run, cancel the task awaiting it once it prints, see it raise."""
    started = asyncio.Event()
    slow = sky_job(tmp, "q-screen-0", source=source(SLEEP=30.0))
    run = asyncio.create_task(b.run(slow, lambda _l: started.set()))
    await asyncio.wait_for(started.wait(), 10)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run


@contextlib.asynccontextmanager
async def fake_sky(tmp: Path) -> AsyncIterator[FakeSky]:
    """A FakeSky without latencies under `tmp/clusters`, its jobs killed at the end."""
    sky = FakeSky(tmp / "clusters", time_scale=0.0)
    try:
        yield sky
    finally:
        await sky.close()
