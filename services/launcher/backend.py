"""The interface every launcher backend implements: slots, run(job, on_line), cancel."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol

from services.contracts import RunFinished, RunKeys, split_lines

LineCallback = Callable[[str], None]
# (host, accelerator) where a run really goes, told by a backend that chooses it late.
PlacedCallback = Callable[[str, str], None]

# Variables never passed to a trainer process: anything that looks like a credential.
_SECRET_PARTS = (
    "API_KEY",
    "TOKEN",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "CREDENTIAL",
    "PRIVATE_KEY",
    "ACCESS_KEY",
    "SESSION_KEY",
    "AUTH",
)
_SECRET_PREFIXES = ("NATS_", "NIGHTSHIFT_NATS_", "AWS_", "GOOGLE_", "AZURE_", "GCLOUD_")


@dataclass(frozen=True)
class Job:
    """One run of one variant on one slot."""

    run_id: str
    variant_id: str
    campaign: str
    replica: int
    source: str
    harness_dir: Path
    edit_file: str = "train.py"
    profile: str = "cpu"
    timeout_s: float = 600.0
    reference_source: str | None = None  # sim: the campaign's seed (the landscape's reference)
    slot: int = 0
    # Backends with `reports_placement` call it once they know the host (skypilot: the
    # cluster a run is allocated to, which may not be its slot's).
    on_placed: PlacedCallback | None = field(default=None, compare=False, repr=False)


_LOG = ("log_path", "log_text")  # the outcome's log, not an event field


@dataclass
class RunOutcome:
    exit_code: int | None
    started_at: float
    finished_at: float
    log_path: Path | None = None  # the full log on disk (local), or
    log_text: str = ""  # the full log in memory (sim)
    timed_out: bool = False
    cancelled: bool = False
    infra_failure: bool = False
    infra_reason: str = ""
    clock_scale: float = 1.0  # wall seconds per trainer second (the sim's time scale)
    budget_s: float = 0.0  # training seconds the run was given (0: not known)
    gpu_seconds: float = 0.0  # GPUs x seconds the run held (skypilot meters it)
    gpu_usd: float = 0.0  # gpu_seconds at its tier's price

    def read_log(self) -> str:
        if self.log_path is not None and self.log_path.is_file():
            return self.log_path.read_text(errors="replace")
        return self.log_text

    def finished_event(self, keys: RunKeys, log_tail: str) -> RunFinished:
        """The RunFinished that reports this outcome of the attempt `keys` names: each of its
        fields but the log, which is stored under the run id (`log_tail`: its last lines)."""
        reported = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _LOG}
        return RunFinished(**keys, **reported, log_key=keys["run_id"], log_tail=log_tail)


class FixedSlots:
    """`slots` and `intake` of a backend that runs one job per slot and queues none."""

    _slots: int

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def intake(self) -> int:
        return self._slots


class Backend(Protocol):
    name: str
    # True: the backend calls job.on_placed before the run starts, and RunStarted waits for
    # it (the host a run really uses); False: RunStarted names placement(slot) at once.
    reports_placement: bool

    @property
    def slots(self) -> int:
        """How many runs may go on at once."""
        ...

    @property
    def intake(self) -> int:
        """How many runs the launcher may hand it at once: `slots`, or more for a backend
        that queues the next run behind the one ending (skypilot's pre-submission)."""
        ...

    def placement(self, slot: int) -> tuple[str, str]:
        """(host, accelerator) a run on `slot` uses."""
        ...

    async def run(self, job: Job, on_line: LineCallback) -> RunOutcome:
        """Run the job to the end (exit, timeout, cancel); never raises for a failed run."""
        ...

    async def cancel(self, run_id: str, reason: str = "") -> None:
        """Stop a run now; its outcome says cancelled. Unknown run ids are ignored."""
        ...


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return upper.startswith(_SECRET_PREFIXES) or any(part in upper for part in _SECRET_PARTS)


def scrubbed_env(profile: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a trainer process: ours minus credentials, plus its profile."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not is_secret_name(k)}
    env["NIGHTSHIFT_PROFILE"] = profile
    env["PYTHONUNBUFFERED"] = "1"
    return env


def log_tail(text: str, lines: int, max_chars: int = 16_000) -> str:
    """The last `lines` non-empty lines (carriage returns count as line ends)."""
    kept = [line for line in split_lines(text) if line.strip()][-lines:] if lines > 0 else []
    tail = "\n".join(kept)
    return tail[-max_chars:] + ("\n" if tail else "")
