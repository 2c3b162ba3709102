"""What both skypilot modes (clusters, pool) do with a run's log and its outcome.

A run's directory under `runs_path/<campaign>/<run_id>` holds `run.log`; SkyPilot's stream
of the job's output is written there line by line (its `(task, pid=N)` prefixes and colours
stripped) and handed to `on_line`; the final status becomes train.py's exit code or an
infrastructure failure with the reason the user reads (`RunFailed`).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from services.contracts import cancelled_line, infra_failure_line, split_lines
from services.launcher import skypilot_tiers as st
from services.launcher.backend import LineCallback, RunOutcome
from services.telemetry import get_logger


class RunFailed(Exception):
    """A run that ends as an infrastructure failure, with the reason the user reads."""


def make_run_dir(run_dir: Path) -> Path:
    """An empty run directory with an empty run.log (a redelivered run starts over)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    log_path = run_dir / "run.log"
    log_path.write_bytes(b"")
    return log_path


async def stream_into(
    chunks: AsyncIterator[str], out: RunOutcome, on_line: LineCallback, skip: int = 0
) -> int:
    """Write the stream's lines to run.log and on_line, the first `skip` dropped (already
    written by an earlier stream of the same job); the lines the stream held."""
    assert out.log_path is not None
    pending, seen = "", 0
    with out.log_path.open("a") as sink:
        async for chunk in chunks:
            *lines, pending = split_lines(pending + chunk)
            for raw in lines:
                seen += 1
                if seen > skip:
                    emit(st.clean_line(raw), sink, on_line)
        if pending:
            seen += 1
            if seen > skip:
                emit(st.clean_line(pending), sink, on_line)
    return seen


def emit(line: str, sink: Any, on_line: LineCallback) -> None:
    sink.write(line + "\n")
    sink.flush()
    if line.strip():
        with contextlib.suppress(Exception):  # a broken observer must not end the run
            on_line(line)


def append(out: RunOutcome, line: str) -> None:
    if out.log_path is None:
        out.log_text += line + "\n"
        return
    with out.log_path.open("a") as fh:
        fh.write(f"\n{line}\n")


def mark_cancelled(out: RunOutcome, reason: str) -> None:
    out.cancelled = True
    append(out, cancelled_line(reason))


def mark_infra(out: RunOutcome, run_id: str, reason: str, cancel_reason: str | None) -> None:
    """An infrastructure failure, unless the run was stopped on purpose (then a cancel)."""
    if cancel_reason is not None:
        mark_cancelled(out, cancel_reason)
        return
    get_logger(component="launcher.skypilot").warning(
        "run_infra_failure", run_id=run_id, reason=reason
    )
    out.infra_failure = True
    out.infra_reason = reason
    append(out, infra_failure_line(reason))


def exit_code_or_fail(out: RunOutcome, status: str, what: str, why: dict[str, str]) -> None:
    """SUCCEEDED / FAILED with the code the run script printed: train.py's own; any other
    end (or FAILED without a code: the script was killed) is RunFailed, never the variant's."""
    code = st.exit_code_of(out.read_log())
    if status in ("SUCCEEDED", "FAILED") and code is not None:
        out.exit_code = code
        return
    if status == "SUCCEEDED":  # a template whose run script prints no code
        out.exit_code = 0
        return
    reason = why.get(status, "train.py never finished (killed with its machine?)")
    raise RunFailed(f"{what} ended {status}: {reason}; not the variant's fault, it will run again")
