"""A small self-contained HTML dashboard (no external assets), refreshed every few seconds."""

from __future__ import annotations

import sqlite3
import time
from html import escape
from typing import Any

from services.ledger import queries

REFRESH_S = 5
_CAMPAIGNS_SHOWN = 5
NONE_SHOWN = "\N{EN DASH}"  # in a cell with no value

_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 10px;text-align:left;
border-bottom:1px solid #ddd}th{background:#eee}.num{text-align:right;font-family:monospace}
.keep{color:#1a7f37;font-weight:bold}.discard{color:#777}.crash{color:#c62828}
.mono{font-family:monospace}svg{background:#fff;border:1px solid #ddd}
"""


def _fmt(value: Any, digits: int = 6) -> str:
    return NONE_SHOWN if value is None else f"{float(value):.{digits}f}"


def _when(ts: Any) -> str:
    return (
        NONE_SHOWN if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts)))
    )


def render_chart(
    series: list[tuple[float, float]],
    history: list[dict[str, Any]],
    width: int = 640,
    height: int = 220,
) -> str:
    """An inline SVG: each ok result as a dot, the best so far as a step line."""
    if not series:
        return '<p class="discard">no ok results yet</p>'
    pad = 30
    xs = [t for t, _ in series]
    ys = [v for _, v in series] + [float(h["value"]) for h in history]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    dx, dy = (x1 - x0) or 1.0, (y1 - y0) or 1.0

    def px(t: float) -> float:
        return pad + (t - x0) / dx * (width - 2 * pad)

    def py(v: float) -> float:
        return height - pad - (v - y0) / dy * (height - 2 * pad)

    dots = "".join(
        f'<circle cx="{px(t):.1f}" cy="{py(v):.1f}" r="2.5" fill="#90a4ae"/>' for t, v in series
    )
    points = [(max(float(h["ts"]), x0), float(h["value"])) for h in history]
    line = ""
    if points:
        path = (
            f"M{px(points[0][0]):.1f} {py(points[0][1]):.1f}"
            + "".join(f" H{px(t):.1f} V{py(v):.1f}" for t, v in points[1:])
            + f" H{px(max(x1, points[-1][0])):.1f}"
        )
        line = f'<path d="{path}" fill="none" stroke="#1a7f37" stroke-width="2"/>'
    labels = (
        f'<text x="2" y="{pad - 8}" font-size="11">{y1:.4f}</text>'
        f'<text x="2" y="{height - 8}" font-size="11">{y0:.4f}</text>'
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
        f"{labels}{dots}{line}</svg>"
    )


def _summary_table(campaigns: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{escape(c['name'])}</td><td>{escape(c['status'])}</td>"
        f"<td>{escape(c['metric'])} ({escape(c['direction'])})</td>"
        f"<td class=num>{c['variants']}</td><td class=mono>{escape(c['best_variant_id'] or NONE_SHOWN)}"
        f"</td><td class=num>{_fmt(c['best_value'])}</td><td>{_when(c['started_at'])}</td></tr>"
        for c in campaigns
    )
    return (
        "<table><tr><th>campaign</th><th>status</th><th>metric</th><th>variants</th>"
        f"<th>best</th><th>value</th><th>started</th></tr>{rows}</table>"
    )


def _results_table(results: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{_when(r['evaluated_at'])}</td><td class=mono>{escape(r['run_id'])}</td>"
        f"<td>{escape(r['status'])}</td><td class=num>{_fmt(r['value'])}</td>"
        f"<td class={escape(r['variant_status'])}>{escape(r['variant_status'])}</td>"
        f"<td>{escape(r['title'] or '')}</td><td>{escape(r['crash_reason'] or '')}</td></tr>"
        for r in results
    )
    return (
        "<table><tr><th>evaluated</th><th>run</th><th>result</th><th>value</th>"
        f"<th>verdict</th><th>title</th><th>crash reason</th></tr>{rows}</table>"
    )


def _campaign_section(conn: sqlite3.Connection, name: str) -> str:
    summary = queries.campaign_summary(conn, name)
    if summary is None:
        return ""
    counts = summary["counts"]
    top = summary["best"]
    best = (
        f"best <span class=mono>{escape(top['variant_id'])}</span> "
        f"{escape(summary['metric'])} = <b>{_fmt(top['value'])}</b> "
        f"({top['runs']} runs) — {escape(top.get('title') or '')}"
        if top
        else "no best yet"
    )
    variants = ", ".join(f"{k} {v}" for k, v in sorted(counts["variants"].items()))
    chart = render_chart(queries.metric_series(conn, name), queries.best_history(conn, name))
    return (
        f"<h2>{escape(name)} <small>({escape(summary['status'])})</small></h2>"
        f"<p>{best}</p><p>proposed {counts['proposed']} ({escape(variants)}); running "
        f"{counts['running']}; evaluated {counts['evaluated']}; dead letters "
        f"{counts['dead_letters']}; LLM ${summary['llm']['usd']:.2f}; "
        f"GPU ${summary['gpu']['usd']:.2f}</p>{chart}"
        f"{_results_table(queries.recent_results(conn, name, limit=20))}"
    )


def render_dashboard(conn: sqlite3.Connection) -> str:
    campaigns = queries.list_campaigns(conn)
    recent = sorted(campaigns, key=lambda c: c["started_at"] or 0, reverse=True)
    sections = "".join(_campaign_section(conn, c["name"]) for c in recent[:_CAMPAIGNS_SHOWN])
    body = _summary_table(campaigns) + sections if campaigns else "<p>no campaign yet</p>"
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        f'<meta http-equiv="refresh" content="{REFRESH_S}">'
        f"<title>nightshift</title><style>{_STYLE}</style></head>"
        f"<body><h1>nightshift</h1>{body}</body></html>"
    )
