"""What the launcher's tests share (and the evaluator's, which run the sim launcher too): a
backend Job with defaults, a harness archive, a proposal published on the bus."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from services import contracts as c
from services.bus import Bus
from services.launcher.backend import Job, RunOutcome


def job(source: str, run_id: str, **kw: object) -> Job:
    """A Job for `source` as run `run_id` (its variant is the id's first part); `kw` wins."""
    fields: dict[str, object] = {
        "run_id": run_id,
        "variant_id": run_id.split("-")[0],
        "campaign": "c",
        "replica": 0,
        "source": source,
        "harness_dir": Path("/nonexistent"),
    }
    fields.update(kw)
    return Job(**fields)  # type: ignore[arg-type]


def harness_tar(files: dict[str, str]) -> bytes:
    """A harness archive as the CLI stores it: `files` under trainer/."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"trainer/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def propose(bus: Bus, campaign: str, source: str) -> c.VariantProposed:
    """Publish `source` as a root proposal of `campaign` (its source stored first)."""
    variant_id = c.variant_id_for(campaign, source)
    event = c.VariantProposed(
        campaign=campaign,
        event_id=f"proposed:{campaign}:{variant_id}",
        variant_id=variant_id,
        parent_id=None,
        source_digest=await bus.put_source(source),
        diff="",
        title="baseline",
    )
    await bus.publish(event)
    return event


def finished_from(outcome: RunOutcome, run_id: str = "r", log_tail: str = "") -> c.RunFinished:
    """The RunFinished a launcher would publish for `outcome` (its clock and budget too)."""
    keys = c.run_keys("finished", "c", run_id, run_id.split("-")[0], "default", 0, 1)
    return outcome.finished_event(keys, log_tail)
