"""Turn the trainer's progress lines into RunProgress fields."""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.contracts import PROGRESS_LINE


@dataclass(frozen=True)
class Progress:
    step: int
    fraction: float  # of the training budget, 0..1
    train_loss: float  # nan when the trainer printed nan/inf
    tok_per_s: float


def parse_progress(line: str) -> Progress | None:
    """`step 00953 (100.0%) | loss: 3.12 | ... | tok/sec: 1,668,123 | ...` or None."""
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
