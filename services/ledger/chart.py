"""The progress chart's geometry, as autoresearch's progress.png draws it.

Every ok result is a dot at (experiment number, metric); kept results (variants that became
the best) are green and labelled with their title; the running best is a step line. The
template `chart.svg` turns this into an inline SVG (autoescaped: titles are text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.ledger.overview import Progress

LABEL_CHARS = 38


@dataclass(frozen=True)
class Dot:
    x: float
    y: float
    experiment: int
    value: float
    run_id: str
    variant_id: str
    kept: bool
    title: str


@dataclass(frozen=True)
class Tick:
    pos: float
    label: str


@dataclass
class Chart:
    width: int
    height: int
    left: float
    top: float
    right: float
    bottom: float
    x_label: str
    y_label: str
    dots: list[Dot] = field(default_factory=list)
    step_path: str = ""
    x_ticks: list[Tick] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)

    @property
    def labels(self) -> list[Dot]:
        return [d for d in self.dots if d.kept]


def nice_step(span: float, target: int) -> float:
    """A step of 1, 2 or 5 times a power of ten giving about `target` intervals."""
    raw = max(span, 1e-12) / max(target, 1)
    power = 10 ** math.floor(math.log10(raw))
    return float(next(m * power for m in (1, 2, 5, 10) if m * power >= raw))


def _ticks(lo: float, hi: float, target: int) -> list[float]:
    step = nice_step(hi - lo, target)
    first = math.ceil(lo / step - 1e-9) * step
    out, v = [], first
    while v <= hi + step * 1e-9:
        out.append(v)
        v += step
    return out


def _decimals(step: float) -> int:
    return max(0, -math.floor(math.log10(step))) if step < 1 else 0


def draw(progress: Progress, width: int = 900, height: int = 380) -> Chart:
    better = "lower" if progress.direction == "minimize" else "higher"
    chart = Chart(
        width=width,
        height=height,
        left=78.0,
        top=18.0,
        right=width - 24.0,
        bottom=height - 52.0,
        x_label="experiment # (evaluated results in order, crashes counted)",
        y_label=f"{progress.metric} ({better} is better)",
    )
    if not progress.points:
        return chart
    values = [p.value for p in progress.points] + [s.value for s in progress.best]
    y0, y1 = min(values), max(values)
    pad = (y1 - y0) * 0.06 or abs(y0) * 0.01 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    x0, x1 = 0.5, max(progress.experiments, 1) + 0.5

    def px(x: float) -> float:
        return chart.left + (x - x0) / (x1 - x0) * (chart.right - chart.left)

    def py(y: float) -> float:
        return chart.bottom - (y - y0) / (y1 - y0) * (chart.bottom - chart.top)

    chart.dots = [
        Dot(px(p.experiment), py(p.value), p.experiment, p.value, p.run_id, p.variant_id,
            p.kept, p.title[:LABEL_CHARS] + ("…" if len(p.title) > LABEL_CHARS else ""))
        for p in progress.points
    ]  # fmt: skip
    if progress.best:
        first = progress.best[0]
        path = f"M{px(first.experiment):.1f} {py(first.value):.1f}"
        for step in progress.best[1:]:
            path += f" H{px(step.experiment):.1f} V{py(step.value):.1f}"
        chart.step_path = path + f" H{px(x1):.1f}"
    y_step = nice_step(y1 - y0, 5)
    chart.y_ticks = [Tick(py(v), f"{v:.{_decimals(y_step) + 1}f}") for v in _ticks(y0, y1, 5)]
    chart.x_ticks = [
        Tick(px(v), str(int(v))) for v in _ticks(1, progress.experiments, 8) if v == int(v)
    ]
    return chart
