"""The evaluator's parser and classifier over real-shaped logs."""

from __future__ import annotations

import pytest

from services.contracts import RunFinished, parse_summary
from services.evaluator.classify import evaluate_run, last_exception

PROGRESS = "".join(
    f"\rstep {s:05d} ({s / 9.53:.1f}%) | loss: {4.0 - s / 953:.6f} | lrm: 1.00 | dt: 314ms | "
    f"tok/sec: 1,668,123 | mfu: 39.8% | epoch: 1 | remaining: {300 - s * 0.3:.0f}s    "
    for s in range(0, 953, 100)
)
BLOCK = """---
val_bpb:          0.997900
training_seconds: 300.1
total_seconds:    325.9
peak_vram_mb:     45060.2
mfu_percent:      39.80
total_tokens_M:   499.6
num_steps:        953
num_params_M:     50.3
depth:            8
"""
HEADER = "Profile: gpu, device: cuda, seed: 42, vocab_size: 8,192\nTime budget: 300.0s\n"
OK_LOG = HEADER + PROGRESS + "\n" + BLOCK
CRASH_LOG = (
    HEADER
    + PROGRESS
    + """
Traceback (most recent call last):
  File "/runs/c/r/train.py", line 612, in <module>
    lrm = 1 / (progress - progress)
          ~~^~~~~~~~~~~~~~~~~~~~~~~
ZeroDivisionError: division by zero
"""
)
CHAINED_LOG = """Traceback (most recent call last):
  File "train.py", line 3, in <module>
    import flash_attn
ModuleNotFoundError: No module named 'flash_attn'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "train.py", line 5, in <module>
    raise RuntimeError("no attention kernel")
RuntimeError: no attention kernel
"""
SYNTAX_LOG = """  File "/runs/c/r/train.py", line 41
    DEPTH = (8
            ^
SyntaxError: '(' was never closed
"""
FAIL_LOG = (
    HEADER + "step 00000 (0.0%) | loss: 9.010000 | lrm: 1.00 | dt: 900ms | tok/sec: 1,000 | x\n"
    "step 00001 (0.1%) | loss: nan | lrm: 1.00 | dt: 310ms | tok/sec: 1,690,000 | x\nFAIL\n"
)
OOM_LOG = (
    HEADER
    + """Traceback (most recent call last):
  File "/runs/c/r/train.py", line 598, in <module>
    loss = model(x, y)
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB
"""
)
TRUNCATED_LOG = HEADER + PROGRESS + "\n---\nval_bp"
GARBAGE_LOG = "\x00\x01 binary \ufffd noise\n--- not a block\nval_bpb = 0.9\n"
NOISY_TAIL_LOG = OK_LOG + "[W1028 12:00:00 ProcessGroupNCCL.cpp] warning at exit\n"
CR_BLOCK_LOG = HEADER + PROGRESS + "\r---\r\nval_bpb: 0.991000\r\nnum_steps: 10\r\n"


def finished(exit_code: int | None = 0, **kw: object) -> RunFinished:
    fields: dict[str, object] = {
        "campaign": "c",
        "run_id": "v-default-0",
        "variant_id": "v",
        "tier": "default",
        "exit_code": exit_code,
        "started_at": 100.0,
        "finished_at": 430.0,
        "log_key": "v-default-0",
        "log_tail": "",
    }
    fields.update(kw)
    return RunFinished(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        (OK_LOG, {"val_bpb": 0.9979, "num_steps": 953.0, "depth": 8.0}),
        (NOISY_TAIL_LOG, {"val_bpb": 0.9979, "mfu_percent": 39.8}),
        (CR_BLOCK_LOG, {"val_bpb": 0.991, "num_steps": 10.0}),
        (OK_LOG + "\n" + BLOCK.replace("0.997900", "0.990000"), {"val_bpb": 0.99}),  # last wins
        ("---\nval_bpb: nan\n", {"val_bpb": float("nan")}),
        (CRASH_LOG, None),
        (FAIL_LOG, None),
        (OOM_LOG, None),
        (TRUNCATED_LOG, None),
        (GARBAGE_LOG, None),
        ("", None),
        (BLOCK + "\n---\n", None),  # a `---` with nothing after it: cut off there
    ],
    ids=[
        "ok",
        "trailing-noise",
        "carriage-returns",
        "last-block",
        "nan",
        "crash",
        "fail",
        "oom",
        "truncated",
        "garbage",
        "empty",
        "cut-after-dashes",
    ],
)
def test_parse_summary(log: str, expected: dict[str, float] | None) -> None:
    block = parse_summary(log)
    if expected is None:
        assert block is None
        return
    assert block is not None
    for key, value in expected.items():
        if value != value:  # nan
            assert block[key] != block[key]
        else:
            assert block[key] == pytest.approx(value)


@pytest.mark.parametrize(
    ("log", "exit_code", "extra", "status", "reason"),
    [
        (OK_LOG, 0, {}, "ok", ""),
        (CRASH_LOG, 1, {}, "crash", "ZeroDivisionError: division by zero"),
        (CHAINED_LOG, 1, {}, "crash", "RuntimeError: no attention kernel"),
        (SYNTAX_LOG, 1, {}, "crash", "SyntaxError: '(' was never closed"),
        (FAIL_LOG, 1, {}, "diverged", "diverged"),
        (OOM_LOG, 1, {}, "oom", "torch.OutOfMemoryError: CUDA out of memory"),
        (HEADER + PROGRESS + "\nKilled\n", -9, {}, "oom", "out-of-memory killer"),
        (TRUNCATED_LOG, 0, {}, "crash", "no summary block"),
        (HEADER + "---\ntraining_seconds: 300.1\n", 0, {}, "crash", "has no val_bpb"),
        (GARBAGE_LOG, 0, {}, "crash", "no summary block"),
        ("", 1, {}, "crash", "exit code 1; last line: (empty log)"),
        (OK_LOG, 2, {}, "crash", "exit code 2"),
        ("---\nval_bpb: nan\n", 0, {}, "diverged", "val_bpb is nan"),
        ("---\nval_bpb: 0.0\n", 0, {}, "implausible", "implausible val_bpb"),
        ("---\nval_bpb: 31.2\n", 0, {}, "implausible", "implausible val_bpb"),
        ("---\nval_bpb: 0.99\nnum_steps: -3\n", 0, {}, "implausible", "implausible num_steps"),
        (OK_LOG, None, {"timed_out": True}, "timeout", "timed out after 330s"),
        (
            OK_LOG,
            None,
            {"infra_failure": True, "infra_reason": "harness h is missing"},
            "infra",
            "harness h is missing",
        ),
        (
            PROGRESS + "\n[nightshift] cancelled: campaign stopped\n",
            -15,
            {"cancelled": True},
            "crash",
            "cancelled: campaign stopped",
        ),
        (PROGRESS, -15, {"cancelled": True}, "crash", "cancelled: by request"),
    ],
)
def test_evaluate_run(
    log: str, exit_code: int | None, extra: dict[str, object], status: str, reason: str
) -> None:
    evaluation = evaluate_run(finished(exit_code, **extra), log, "val_bpb")
    assert evaluation.status == status
    assert reason in evaluation.crash_reason
    if status == "ok":
        assert evaluation.value == pytest.approx(0.9979)
        assert evaluation.metrics["num_steps"] == 953
    else:
        assert evaluation.value is None


def test_ok_metrics_drop_non_finite_values() -> None:
    evaluation = evaluate_run(finished(0), "---\nval_bpb: 0.99\nmfu_percent: nan\n")
    assert evaluation.status == "ok" and evaluation.metrics == {"val_bpb": 0.99}


def test_other_metric_names_are_only_required_finite() -> None:
    evaluation = evaluate_run(finished(0), "---\naccuracy: 93.5\n", "accuracy")
    assert evaluation.status == "ok" and evaluation.value == 93.5


def test_last_exception_without_traceback_header() -> None:
    assert last_exception(["hello", "ValueError: bad"]) == "ValueError: bad"
    assert last_exception(["hello"]) == ""


def test_a_timeout_names_the_run_timeout_not_the_slots_wall_time() -> None:
    """Finding of issue 12: "timed out after 9s" for a 3 s timeout."""
    event = finished(None, timed_out=True, started_at=100.0, finished_at=109.0)
    evaluation = evaluate_run(event, PROGRESS, "val_bpb", timeout_s=3.0)
    assert evaluation.status == "timeout"
    assert "run timeout of 3s" in evaluation.crash_reason and "9s" not in evaluation.crash_reason
