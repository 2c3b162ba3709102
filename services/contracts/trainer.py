"""What a training script and nightshift agree on (DESIGN §5), defined once.

- the knobs: UPPER_CASE numeric constants at the top of the edited file, which the grid
  strategy rewrites and the sim landscape scores;
- the progress line the trainer prints per step, which the launcher turns into RunProgress;
- the summary block that ends a run's output: `---`, then `key: number` lines;
- the marker lines the launcher adds to a run's log (cancelled, timed out, ...);
- the harness archive: a tar.gz of the trainer directory minus the edited file, which the
  CLI writes and the launcher (extract) and proposer (program.md) read.

The trainer itself imports nothing from here: it ships as files to GPU machines.
"""

from __future__ import annotations

import ast
import io
import math
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# --- the knobs -----------------------------------------------------------------

_KNOB_OPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
}


def knob_value(node: ast.expr) -> int | float | None:
    """The value of a knob's right-hand side: a numeric literal or a small arithmetic of
    literals (`0.04`, `-1e-3`, `2**19`); None for anything else.

    The trainer contract (DESIGN §5) puts the knobs at the top of train.py as UPPER_CASE
    constants; the grid strategy rewrites them and the sim landscape scores them.
    """
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            return None
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        inner = knob_value(node.operand)
        if inner is None:
            return None
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.BinOp) and type(node.op) in _KNOB_OPS:
        left, right = knob_value(node.left), knob_value(node.right)
        if left is None or right is None or (isinstance(node.op, ast.Pow) and abs(right) > 64):
            return None
        try:
            value: int | float = _KNOB_OPS[type(node.op)](left, right)
        except (ZeroDivisionError, OverflowError):
            return None
        return value
    return None


KNOB_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


def knob_assignments(tree: ast.Module) -> Iterator[tuple[ast.Name, ast.expr]]:
    """(name, value) of each single-target UPPER_CASE assignment at the top of a module,
    before its first def or class: where the knobs live."""
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            return
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target, value = stmt.targets[0], stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            target, value = stmt.target, stmt.value
        else:
            continue
        if isinstance(target, ast.Name) and KNOB_NAME.fullmatch(target.id):
            yield target, value


# A top-level knob line: `NAME = number` (or 2**k), an optional comment.
_KNOB_LINE = re.compile(
    r"([A-Z][A-Z0-9_]*)(\s*=\s*)([-+]?(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][-+]?\d+)?"
    r"(?:\s*\*\*\s*\d+)?)(\s*(?:#.*)?)"
)


def knob_values_only(source: str, parent_source: str) -> bool:
    """True when `source` is its parent with only the numbers of knob lines changed."""
    lines, parent_lines = source.splitlines(), parent_source.splitlines()
    if len(lines) != len(parent_lines):
        return False
    changed = 0
    for new, old in zip(lines, parent_lines, strict=True):
        if new == old:
            continue
        changed += 1
        a, b = _KNOB_LINE.fullmatch(new), _KNOB_LINE.fullmatch(old)
        if a is None or b is None or a.group(1) != b.group(1):
            return False
    return changed > 0


# --- log lines ---------------------------------------------------------------------------


def split_lines(text: str) -> list[str]:
    """Lines of a log, where a carriage return (a progress bar's redraw) also ends a line."""
    return re.split(r"\r\n|\r|\n", text)


# --- the progress line -------------------------------------------------------------------

# `step 00953 (100.0%) | loss: 3.12 | ... | tok/sec: 1,668,123 | ...` (see trainer/train.py)
PROGRESS_LINE = re.compile(r"^step (\d+) \(([\d.]+)%\) \| loss: ([-+\w.]+) .*?tok/sec: ([\d,]+)")


@dataclass(frozen=True)
class Progress:
    step: int
    fraction: float  # of the training budget, 0..1
    train_loss: float  # nan when the trainer printed nan/inf
    tok_per_s: float


def parse_progress(line: str) -> Progress | None:
    """The fields of one progress line, or None for any other line."""
    match = PROGRESS_LINE.match(line.strip("\r\n\t "))
    if match is None:
        return None
    step, percent, loss, tok = match.groups()
    try:
        train_loss = float(loss)
    except ValueError:
        train_loss = math.nan
    return Progress(
        step=int(step),
        fraction=min(max(float(percent) / 100.0, 0.0), 1.0),
        train_loss=train_loss,
        tok_per_s=float(tok.replace(",", "")),
    )


# --- the summary block -------------------------------------------------------------------

# autoresearch's block, in its order. The metric (val_bpb by default) is the campaign's.
SUMMARY_KEYS = (
    "val_bpb",
    "training_seconds",
    "total_seconds",
    "peak_vram_mb",
    "mfu_percent",
    "total_tokens_M",
    "num_steps",
    "num_params_M",
    "depth",
)
# What a run measured: only the harness (through train.py's final print of measured
# values) may print these; a variant that prints a literal one is faking a result.
MEASURED_KEYS = SUMMARY_KEYS[:4]
# Keys that can never be negative.
NON_NEGATIVE_KEYS = SUMMARY_KEYS[1:]
SUMMARY_START = "---"

_KEY_LINE = re.compile(
    r"^\s*([A-Za-z_][\w.]*)\s*:\s*([-+]?(?:[0-9][0-9_]*(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?:[eE][-+]?[0-9]+)?|[-+]?(?:nan|inf|infinity))\s*$",
    re.IGNORECASE,
)


def parse_summary(log_text: str) -> dict[str, float] | None:
    """The keys and values of the last summary block; None when there is none.

    The block starts at the last line that is exactly `---` and runs over the `key: number`
    lines right after it; whatever follows (a warning at exit, a launcher note) is ignored.
    A `---` with no key line after it (a run cut off right there) is no block.
    """
    lines = split_lines(log_text)
    starts = [i for i, line in enumerate(lines) if line.strip() == SUMMARY_START]
    if not starts:
        return None
    values: dict[str, float] = {}
    for line in lines[starts[-1] + 1 :]:
        if not line.strip() and not values:
            continue
        match = _KEY_LINE.match(line)
        if match is None:
            break
        values[match.group(1)] = float(match.group(2).replace("_", ""))
    return values or None


def format_summary(values: dict[str, str]) -> list[str]:
    """The block's lines as the trainer prints them: `---`, then `key:` padded to a column."""
    return [SUMMARY_START, *(f"{key + ':':<18}{value}" for key, value in values.items())]


# --- the launcher's marker lines ---------------------------------------------------------

# A line the launcher adds to a run's log (timeout, cancellation), so a reader knows why.
MARKER = "[nightshift]"
_CANCEL_LINE = re.compile(r"^\[nightshift\] cancelled: (.*)$")


def cancelled_line(reason: str) -> str:
    return f"{MARKER} cancelled: {reason or 'by request'}"


def timed_out_line(timeout_s: float) -> str:
    return f"{MARKER} timed out after {timeout_s:.0f}s; the process group was killed"


def infra_failure_line(reason: str) -> str:
    return f"{MARKER} infrastructure failure: {reason}"


def truncated_line() -> str:
    return f"{MARKER} log truncated to its end"


def output_cut_line(cut_bytes: int, max_bytes: int) -> str:
    """The line where the launcher cut the middle of a log longer than its cap."""
    return (
        f"{MARKER} {cut_bytes} bytes of output cut here "
        f"(the stored log keeps the first and last {max_bytes // 2} bytes)"
    )


_TIMEOUT_LINE = re.compile(r"^\[nightshift\] timed out after (\d+)s")


def timeout_seconds(log_text: str) -> int | None:
    """The configured timeout on a log's timed-out marker; None when there is none."""
    found = [m.group(1) for m in map(_TIMEOUT_LINE.match, split_lines(log_text)) if m]
    return int(found[-1]) if found else None


def cancel_reason(log_text: str) -> str | None:
    """The reason on the last cancellation marker of a log; None when there is none."""
    reasons = [m.group(1) for m in map(_CANCEL_LINE.match, split_lines(log_text)) if m]
    return reasons[-1] if reasons else None


# --- the harness archive -----------------------------------------------------------------
# A reproducible tar.gz of the trainer directory without the edited file and caches; its
# members are paths relative to the trainer directory (a tar made elsewhere may nest them
# one directory deeper: `harness_root` finds them either way).


def harness_tar(trainer_dir: Path, edit_file: str) -> bytes:
    """The harness archive of a trainer directory (byte-identical for identical files)."""
    buffer = io.BytesIO()
    files = sorted(
        p
        for p in trainer_dir.rglob("*")
        if p.is_file()
        and p.name != edit_file
        and "__pycache__" not in p.parts
        and not p.name.endswith(".pyc")
    )
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for path in files:
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(trainer_dir)))
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with path.open("rb") as fh:
                tar.addfile(info, fh)
    return buffer.getvalue()


def harness_file(archive: bytes, name: str) -> bytes | None:
    """The bytes of the file `name` (at the harness root) in an archive; None if absent."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
        for member in tar.getmembers():
            parts = member.name.strip("/").split("/")
            if member.isfile() and parts[-1] == name and len(parts) <= 2:
                fh = tar.extractfile(member)
                return fh.read() if fh else None
    return None


def harness_root(directory: Path) -> Path:
    """The directory holding the harness files in an extracted archive."""
    entries = [p for p in directory.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return directory


# --- the training budget -----------------------------------------------------------------

BUDGET_OVERRIDE = "NIGHTSHIFT_TIME_BUDGET"  # prepare.py: training seconds, for tests


def harness_budget(prepare_source: str, profile: str, override: str | None = None) -> float:
    """The training seconds the harness gives a run on `profile`: the `NIGHTSHIFT_TIME_BUDGET`
    override when set, else `time_budget` of the profile in prepare.py's PROFILES table
    (read, never run: the harness is not ours to import); 0 when neither can be read."""
    if override:
        try:
            return max(float(override), 0.0)
        except ValueError:
            return 0.0
    try:
        tree = ast.parse(prepare_source)
    except SyntaxError:
        return 0.0
    for node in tree.body:
        target: ast.expr
        if isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id == "PROFILES":
            budget = _dict_entry(_dict_entry(value, profile), "time_budget")
            try:  # the other entries may be expressions (40 * 524288): read this one only
                return float(ast.literal_eval(budget)) if budget is not None else 0.0
            except (ValueError, TypeError):
                return 0.0
    return 0.0


def _dict_entry(node: ast.expr | None, key: str) -> ast.expr | None:
    """The value written for `key` in a dict literal, unevaluated."""
    if not isinstance(node, ast.Dict):
        return None
    for k, v in zip(node.keys, node.values, strict=True):
        if isinstance(k, ast.Constant) and k.value == key:
            return v
    return None
