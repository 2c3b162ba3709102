"""The context of a Claude proposal request: system blocks, the user turn, the tool, repairs.

The large stable parts (the rules, program.md, the parent source) come first and carry
prompt-caching marks; everything that changes with every wave (results, in flight, fleet,
K) comes last, so consecutive waves off the same parent read the prefix from the cache.
The tool schema does not depend on K, so it never breaks the cached prefix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from services.proposer.strategy import ProposalRequest, ResultRow
from services.proposer.validate import Edit

TOOL_NAME = "propose_variants"
CACHE = {"type": "ephemeral"}
TABLE_BEST = 10  # rows of the best results shown
TABLE_RECENT = 10  # rows of the most recent results shown
TITLE_WIDTH = 72
REASON_WIDTH = 100

# Markers the test server also reads (tests/anthropic_requests.py).
PARENT_OPEN = "<parent_source>"
PARENT_CLOSE = "</parent_source>"

TOOL: dict[str, Any] = {
    "name": TOOL_NAME,
    "description": (
        "Submit one wave of experiment variants of the parent training script. Each variant "
        "is a list of exact-substring edits applied to the parent, with a short title and "
        "the hypothesis it tests."
    ),
    "input_schema": {
        "type": "object",
        "properties": {
            "wave_design": {
                "type": "string",
                "description": "One or two sentences: how the variants of this wave fit together.",
            },
            "variants": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "title": {
                            "type": "string",
                            "description": "Short and distinct, e.g. 'MATRIX_LR 0.04 -> 0.06'.",
                        },
                        "hypothesis": {
                            "type": "string",
                            "description": "What this variant tests and why it might help.",
                        },
                        "edits": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "properties": {
                                    "old": {
                                        "type": "string",
                                        "description": "Exact substring of the parent, occurring exactly once.",
                                    },
                                    "new": {"type": "string", "description": "Its replacement."},
                                },
                                "required": ["old", "new"],
                            },
                        },
                    },
                    "required": ["title", "hypothesis", "edits"],
                },
            },
        },
        "required": ["variants"],
    },
}

_RULES = """\
You are the researcher of an autoresearch campaign that runs on a fleet of GPUs. Each \
experiment is one variant of {edit_file}: the script trains for a fixed wall-clock budget, \
then its summary block reports `{metric}` ({better} is better). You propose the experiments; \
the fleet runs a whole wave of them at the same time.

Designing a wave:
- The K variants of a wave run in parallel from the same parent. Design them together, as a \
researcher with many GPUs would: a sweep of one knob over a few values around the current \
one (both directions, log-spaced), a small factorial grid over 2-3 factors that may interact, \
a width/depth scan, or a few independent ideas once the results say the obvious knobs are spent.
- A difference smaller than the noise floor is not a result. Do not chase it with tiny \
tweaks: make changes large enough to move {metric} by more than the noise.
- Learn from the results: build on what helped, do not retry what failed (read the crash \
reasons: out of memory calls for a smaller batch or model, divergence for lower learning \
rates), and do not repeat anything in flight.
- Keep each variant a small, readable change with one clear hypothesis. The run must still \
fit its time budget and its GPU memory.

Rules for edits (a variant that breaks one is rejected):
- An edit is {{old, new}}. `old` is copied character for character from the parent \
{edit_file} (whitespace and comments included) and occurs in it exactly once: take a whole \
line, or enough context to make it unique. A variant's edits apply in order to the parent.
- The result is valid Python that compiles.
- Leave the harness alone: do not redefine or rebind evaluate_bpb, do not change the data, \
the evaluation or the time budget, do not change or add the printing of the summary block \
(val_bpb:, training_seconds:, ...), and never print literal results.
- Read no files outside the run directory; add no dependencies.
- Every variant differs from its parent and from every variant proposed before.

Answer only by calling the tool `{tool}` once, with exactly the number of variants asked for."""


def system_blocks(
    program: str, *, metric: str, direction: str, edit_file: str
) -> list[dict[str, Any]]:
    """The rules, then program.md; the last block carries the cache mark."""
    better = "lower" if direction == "minimize" else "higher"
    rules = _RULES.format(edit_file=edit_file, metric=metric, better=better, tool=TOOL_NAME)
    blocks: list[dict[str, Any]] = [{"type": "text", "text": rules}]
    if program.strip():
        blocks.append(
            {
                "type": "text",
                "text": f"The campaign's research program (program.md):\n\n{program.strip()}\n",
            }
        )
    blocks[-1]["cache_control"] = CACHE
    return blocks


def user_content(request: ProposalRequest) -> list[dict[str, Any]]:
    """The parent source (cached), then the state of the campaign and the ask."""
    parent = {
        "type": "text",
        "text": (
            f"The parent {request.edit_file} (variant {request.parent_id}); every edit applies "
            f"to exactly this text:\n{PARENT_OPEN}\n{request.parent_source}\n{PARENT_CLOSE}\n"
        ),
        "cache_control": CACHE,
    }
    return [parent, {"type": "text", "text": state_text(request)}]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def _delta(value: float | None, best: float | None) -> str:
    return "-" if value is None or best is None else f"{value - best:+.6f}"


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _row(row: ResultRow, best: float | None) -> str:
    status = row.status
    if row.status != "ok" and row.crash_reason:
        status = f"{row.status}: {_clip(row.crash_reason, REASON_WIDTH)}"
    return f"{_clip(row.title, TITLE_WIDTH)} | {_fmt(row.value)} | {_delta(row.value, best)} | {status}"


def results_table(
    results: list[ResultRow],
    best: float | None,
    direction: str,
    n_best: int = TABLE_BEST,
    n_recent: int = TABLE_RECENT,
) -> str:
    """The best n_best ok results and the n_recent most recent ones, as compact rows."""
    if not results:
        return "No results yet: this is the first wave."
    sign = 1.0 if direction == "minimize" else -1.0
    ok = sorted(
        (r for r in results if r.status == "ok" and r.value is not None),
        key=lambda r: sign * (r.value or 0.0),
    )
    recent = sorted(results, key=lambda r: r.finished_at)[-n_recent:]
    header = "title | value | Δ best | status"
    lines = [f"Best {min(n_best, len(ok))} results:", header]
    lines += [_row(r, best) for r in ok[:n_best]] or ["(no successful run yet)"]
    lines += ["", f"Most recent {len(recent)} results (oldest first):", header]
    lines += [_row(r, best) for r in recent]
    return "\n".join(lines)


def _parent_note(request: ProposalRequest) -> str:
    for row in request.results:
        if row.variant_id == request.parent_id:
            is_best = row.value is not None and row.value == request.best_value
            role = "the current best" if is_best else "a top variant chosen for exploration"
            return f"{_fmt(row.value)}, {role}"
    return "not measured yet (the seed)"


RULE_TEXT = {
    "noise-aware": (
        ": a variant replaces the best only when its mean beats the best's by more than the "
        "margin the measured noise justifies; a close call is re-run first, and an undecided "
        "variant is no result yet"
    ),
    "strict": ": any better single run replaces the best",
}


def noise_text(request: ProposalRequest) -> str:
    """The measured noise per tier, or why the floor is an assumption."""
    if not request.measured_noise:
        return "not measured yet (the floor above is the assumed spread)"
    return ", ".join(
        f"{n.tier} {n.noise:.6f} ({n.dof} degrees of freedom)" for n in request.measured_noise
    )


def decisions_text(request: ProposalRequest) -> str:
    """The keep rule's recent verdicts and the runs it is still waiting for."""
    rule = RULE_TEXT.get(request.keep_rule, "")
    lines = [
        f"Keep decisions of the ledger (rule {request.keep_rule or 'unknown'}{rule}). "
        "Most recent last:",
        "title | decision | tier | n vs best's n | mean vs best's mean | margin | why",
    ]
    for v in request.verdicts:
        lines.append(
            f"{_clip(v.title, TITLE_WIDTH)} | {v.decision} | {v.tier} | "
            f"n {v.n_candidate} vs {v.n_best} | {_fmt(v.mean_candidate)} vs {_fmt(v.mean_best)} "
            f"| {_fmt(v.margin)} | {_clip(v.reason, REASON_WIDTH)}"
        )
    if not request.verdicts:
        lines.append("(none yet)")
    lines += ["", "Pending replicate and promotion runs (results not in yet):"]
    lines += [
        f"- {_clip(p.title, TITLE_WIDTH)}: {p.runs} run(s) on {p.tier} ({_clip(p.reason, 60)})"
        for p in request.pending_runs
    ] or ["(none)"]
    return "\n".join(lines)


def state_text(request: ProposalRequest) -> str:
    better = "lower" if request.direction == "minimize" else "higher"
    failed = sum(1 for r in request.results if r.status != "ok")
    fleet = ", ".join(f"{tier}={n}" for tier, n in sorted(request.free_slots.items())) or "unknown"
    in_flight = (
        "\n".join(f"- {_clip(t, TITLE_WIDTH)}" for t in request.in_flight_titles) or "(none)"
    )
    return "\n".join(
        [
            f"Campaign state, wave {request.wave}:",
            f"- metric: {request.metric} ({better} is better); best so far: {_fmt(request.best_value)}",
            f"- the parent above: {_parent_note(request)}",
            f"- noise floor: {request.noise_floor:.6f} (run-to-run spread of {request.metric}; a "
            "smaller difference is not a result)",
            f"- measured noise per tier: {noise_text(request)}",
            f"- experiments finished: {len(request.results)} ({failed} failed); "
            f"in flight: {len(request.in_flight_titles)}",
            f"- free GPU slots per tier: {fleet}",
            "",
            "Δ best = value - best so far.",
            results_table(request.results, request.best_value, request.direction),
            "",
            "In flight (proposed, not finished; do not repeat these):",
            in_flight,
            "",
            decisions_text(request),
            "",
            f"Wave size K: {request.k}",
            f"Propose exactly {request.k} variants of the parent, designed together as one wave, "
            f"by calling {TOOL_NAME}.",
        ]
    )


def repair_text(accepted: list[str], rejected: list[tuple[str, list[str]]], wanted: int) -> str:
    """The follow-up that lists each rejected variant and why, and asks for replacements."""
    lines: list[str] = []
    if accepted:
        lines.append(f"Accepted ({len(accepted)}): " + "; ".join(f"{t!r}" for t in accepted) + ".")
    if rejected:
        lines.append(f"Rejected ({len(rejected)}):")
        for title, reasons in rejected:
            lines.append(f"- {title!r}: " + "; ".join(reasons))
    lines.append(
        f"Propose exactly {wanted} replacement variants (fixed versions of the rejected ones or "
        f"new ideas; do not repeat the accepted ones) by calling {TOOL_NAME} again. Copy every "
        "`old` exactly from the parent source, and make it occur there exactly once."
    )
    return "\n".join(lines)


def repair_turn(tool_use_ids: list[str], text: str) -> list[dict[str, Any]]:
    """The user turn of a repair round: a tool_result per tool_use (or the text alone)."""
    if not tool_use_ids:
        return [{"type": "text", "text": text}]
    return [
        {
            "type": "tool_result",
            "tool_use_id": tid,
            "is_error": True,
            "content": text if i == 0 else "See the first result.",
        }
        for i, tid in enumerate(tool_use_ids)
    ]


def malformed_text(reason: str, wanted: int) -> str:
    return (
        f"Your answer could not be used: {reason}. Call {TOOL_NAME} now with input "
        '{"variants": [{"title": ..., "hypothesis": ..., "edits": [{"old": ..., "new": ...}]}]} '
        f"holding exactly {wanted} variants."
    )


@dataclass
class Candidate:
    """One variant as the model wrote it, before validation."""

    title: str
    hypothesis: str
    edits: list[Edit]
    problems: list[str] = field(default_factory=list)  # shape problems: rejected as is


def parse_variants(data: object) -> tuple[list[Candidate], str]:
    """The candidates of a tool input, or ([], why the input is unusable)."""
    if not isinstance(data, dict):
        return [], f"the tool input is a {type(data).__name__}, not an object"
    variants = data.get("variants")
    if isinstance(variants, str):  # some answers carry the list as a JSON string
        try:
            variants = json.loads(variants)
        except ValueError:
            return [], "`variants` is a string that is not a JSON list"
    if not isinstance(variants, list):
        return [], "the tool input has no `variants` list"
    if not variants:
        return [], "`variants` is empty"
    return [_candidate(i, item) for i, item in enumerate(variants, start=1)], ""


def _candidate(i: int, item: object) -> Candidate:
    if not isinstance(item, dict):
        return Candidate(f"variant {i}", "", [], [f"variant {i} is not an object"])
    title = " ".join(str(item.get("title") or "").split()) or f"variant {i}"
    hypothesis = str(item.get("hypothesis") or "").strip()
    raw = item.get("edits")
    if not isinstance(raw, list) or not raw:
        return Candidate(title, hypothesis, [], ["`edits` must be a non-empty list of {old, new}"])
    edits: list[Edit] = []
    problems: list[str] = []
    for j, edit in enumerate(raw, start=1):
        if (
            isinstance(edit, dict)
            and isinstance(edit.get("old"), str)
            and isinstance(edit.get("new"), str)
        ):
            edits.append(Edit(edit["old"], edit["new"]))
        else:
            problems.append(f"edit {j} is not an object with string `old` and `new`")
    return Candidate(title, hypothesis, edits, problems)
