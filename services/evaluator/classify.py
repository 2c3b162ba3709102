"""Classify a finished run from its log: ok (with a plausible metric) or how it failed.

What is plausible is plausibility.py's to say."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from services.contracts import (
    RunFinished,
    Status,
    cancel_reason,
    parse_summary,
    split_lines,
    timeout_seconds,
)
from services.evaluator.plausibility import implausible

REASON_CHARS = 500

_OOM = re.compile(
    r"OutOfMemoryError|CUDA out of memory|out of memory|MemoryError"
    r"|CUBLAS_STATUS_ALLOC_FAILED"
)
_NAN_LOSS = re.compile(r"\bloss:\s*[-+]?(nan|inf)", re.IGNORECASE)
_EXCEPTION_LINE = re.compile(
    r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Fault)"
    r"\b.*$"
)
_SIGKILL_CODES = (-9, 137)


@dataclass(frozen=True)
class Evaluation:
    status: Status
    value: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    crash_reason: str = ""


def last_exception(lines: list[str]) -> str:
    """The exception line of the last traceback (`ZeroDivisionError: division by zero`)."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    if starts:
        for line in lines[starts[-1] + 1 :]:
            if not line[:1].isspace():
                return line.strip()
    for line in reversed(lines):  # a SyntaxError at start-up prints no Traceback header
        if _EXCEPTION_LINE.match(line.strip()):
            return line.strip()
    return ""


def _is_fail_line(line: str) -> bool:
    stripped = line.strip()
    return stripped == "FAIL" or stripped.startswith("FAIL:") or stripped.startswith("FAIL ")


def _failure(finished: RunFinished, lines: list[str], why: str) -> Evaluation:
    """A run without a usable result: oom, diverged or crash, from its log and exit code."""
    exception = last_exception(lines)
    if any(_OOM.search(line) for line in lines[-200:]):
        return Evaluation("oom", crash_reason=_cut(exception or "out of memory"))
    if finished.exit_code in _SIGKILL_CODES or (lines and lines[-1].strip() == "Killed"):
        return Evaluation(
            "oom",
            crash_reason=(
                f"killed by SIGKILL (exit {finished.exit_code}) without a timeout or cancel: "
                "most likely the host's out-of-memory killer"
            ),
        )
    if any(_is_fail_line(line) for line in lines) or any(_NAN_LOSS.search(x) for x in lines):
        return Evaluation("diverged", crash_reason="training diverged (loss NaN/inf or FAIL)")
    if exception:
        return Evaluation("crash", crash_reason=_cut(exception))
    last = lines[-1].strip() if lines else "(empty log)"
    return Evaluation("crash", crash_reason=_cut(f"{why}; last line: {last}"))


def _cut(text: str) -> str:
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


def evaluate_run(
    finished: RunFinished, log_text: str, metric: str = "val_bpb", timeout_s: float = 0.0
) -> Evaluation:
    """The result of one finished run (`timeout_s`: the campaign's run timeout, if known)."""
    if finished.infra_failure:
        return Evaluation("infra", crash_reason=_cut(finished.infra_reason or "infrastructure"))
    seconds = finished.finished_at - finished.started_at
    if finished.timed_out:
        # The limit the launcher enforced (its marker line), else the campaign's; the slot's
        # wall time (preparing, copying, the kill's grace period) only when neither is known.
        limit = timeout_seconds(log_text) or timeout_s or None
        shown = f"the run timeout of {limit:g}s" if limit else f"{seconds:.0f}s"
        return Evaluation("timeout", crash_reason=f"timed out after {shown}; killed")
    lines = [line for line in split_lines(log_text) if line.strip()]
    if finished.cancelled:
        reason = cancel_reason(log_text)
        shown = "by request" if reason is None else reason
        return Evaluation("crash", crash_reason=_cut(f"cancelled: {shown}"))
    block = parse_summary(log_text)
    if finished.exit_code != 0:
        return _failure(finished, lines, f"exit code {finished.exit_code}")
    if block is None:
        return _failure(finished, lines, "exit code 0 but no summary block (--- then key: value)")
    value = block.get(metric)
    if value is None:
        return _failure(
            finished, lines, f"summary block has no {metric} (truncated?); keys: {sorted(block)}"
        )
    if not math.isfinite(value):
        return Evaluation("diverged", crash_reason=f"{metric} is {value}")
    metrics = {k: v for k, v in block.items() if math.isfinite(v)}  # NaN is no JSON number
    reason = implausible(finished, metric, value, metrics)
    if reason:
        return Evaluation("implausible", metrics=metrics, crash_reason=_cut(reason))
    return Evaluation("ok", value=value, metrics=metrics)
