"""The claude strategy against a local Messages API server, through the real anthropic client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.contracts import variant_id_for
from services.proposer.claude import ClaudeUnavailable, build_claude_strategy
from services.proposer.prompt import TOOL_NAME
from services.proposer.strategy import PendingRuns, ResultRow, TierNoise, VerdictRow
from services.settings import Settings
from tests.anthropic_requests import request_text
from tests.claude_helpers import CAMPAIGN, PARENT, Make, campaign, depth, lr, make_request
from tests.fake_anthropic import (
    FakeAnthropic,
    error,
    overloaded,
    rate_limited,
    raw_input_answer,
    slow,
    text_answer,
    tool_answer,
    variant,
)


def last_user_blocks(body: dict[str, Any]) -> list[dict[str, Any]]:
    content = body["messages"][-1]["content"]
    assert body["messages"][-1]["role"] == "user"
    return content if isinstance(content, list) else [{"type": "text", "text": content}]


# --- a wave ------------------------------------------------------------------------------


async def test_tool_answer_becomes_proposals_and_request_carries_context(
    fake: FakeAnthropic, make: Make
) -> None:
    fake.push(tool_answer([lr("0.06"), lr("0.02"), depth(6)]))
    results = [
        ResultRow("v1", "baseline", "ok", 0.9912, finished_at=1.0),
        ResultRow("v2", "WEIGHT_DECAY -> 0.1", "ok", 0.9871, finished_at=2.0),
        ResultRow(
            "v3", "DEPTH -> 12", "oom", None, crash_reason="CUDA out of memory", finished_at=3.0
        ),
    ]
    request = make_request(
        k=3,
        results=results,
        best_value=0.9871,
        parent_id="v2",
        noise_floor=7e-4,
        in_flight_titles=["WARMDOWN_RATIO -> 0.3"],
        free_slots={"h100": 2, "h200": 1},
        program="# program.md\nOnly train.py may change. Aim for the lowest val_bpb.",
    )
    proposals = await make().propose(request)

    assert [p.title for p in proposals] == ["MATRIX_LR -> 0.06", "MATRIX_LR -> 0.02", "DEPTH -> 6"]
    assert "MATRIX_LR = 0.06  # Muon learning rate" in proposals[0].source
    assert all(p.parent_id == "v2" and p.rationale.startswith("test:") for p in proposals)
    body = fake.requests[0]
    assert body["tools"][0]["name"] == TOOL_NAME
    assert body["tool_choice"] == {"type": "auto"}  # the default Sonnet 5.5 refuses forcing
    assert body["system"][-1]["cache_control"] == {"type": "ephemeral"}
    assert "Only train.py may change" in body["system"][-1]["text"]
    parent_block, state_block = body["messages"][0]["content"]
    assert parent_block["cache_control"] == {"type": "ephemeral"}
    assert PARENT in parent_block["text"]
    state = state_block["text"]
    assert "cache_control" not in state_block
    for expected in (
        "WEIGHT_DECAY -> 0.1 | 0.987100 | +0.000000 | ok",
        "baseline | 0.991200 | +0.004100 | ok",
        "oom: CUDA out of memory",
        "- WARMDOWN_RATIO -> 0.3",
        "h100=2, h200=1",
        "Wave size K: 3",
        "noise floor: 0.000700",
        "Propose exactly 3 variants",
        "the current best",
    ):
        assert expected in state, expected


async def test_the_request_carries_the_measured_noise_pending_runs_and_verdicts(
    fake: FakeAnthropic, make: Make
) -> None:
    fake.push(tool_answer([lr("0.06")]))
    request = make_request(
        k=1,
        keep_rule="noise-aware",
        measured_noise=[TierNoise("screen", 0.0031, 6), TierNoise("validate", 0.0024, 2)],
        pending_runs=[PendingRuns("MATRIX_LR -> 0.08", "screen", 3, "replicate: a close call")],
        verdicts=[
            VerdictRow("DEPTH -> 6", "discard", "screen", 1, 3, 1.02, 1.0, 0.0, "not better"),
            VerdictRow(
                "MATRIX_LR -> 0.08", "undecided", "screen", 1, 3, 0.995, 1.0, 0.0189, "replicate"
            ),
        ],
    )
    await make().propose(request)
    state = fake.requests[0]["messages"][0]["content"][1]["text"]
    for expected in (
        "measured noise per tier: screen 0.003100 (6 degrees of freedom), "
        "validate 0.002400 (2 degrees of freedom)",
        "rule noise-aware: a variant replaces the best only when",
        "DEPTH -> 6 | discard | screen | n 1 vs 3 | 1.020000 vs 1.000000 | 0.000000 | not better",
        "MATRIX_LR -> 0.08 | undecided | screen | n 1 vs 3 | 0.995000 vs 1.000000 | 0.018900",
        "- MATRIX_LR -> 0.08: 3 run(s) on screen (replicate: a close call)",
    ):
        assert expected in state, expected
    fake.push(tool_answer([lr("0.02")]))
    await make().propose(make_request(k=1))  # nothing measured or decided yet
    state = fake.requests[1]["messages"][0]["content"][1]["text"]
    assert "measured noise per tier: not measured yet" in state
    assert "Pending replicate and promotion runs (results not in yet):\n(none)" in state


async def test_forced_tool_choice_for_models_that_take_it(fake: FakeAnthropic, make: Make) -> None:
    fake.push(tool_answer([lr("0.06")]))
    await make(Settings(model="claude-sonnet-4-6")).propose(make_request(k=1))
    assert fake.requests[0]["tool_choice"] == {"type": "tool", "name": TOOL_NAME}
    assert fake.requests[0]["model"] == "claude-sonnet-4-6"


async def test_refused_forced_tool_choice_falls_back_to_auto(
    fake: FakeAnthropic, make: Make
) -> None:
    fake.push(
        error(
            400,
            "invalid_request_error",
            "tool_choice forcing tool use is not supported",
            retry_after_ms=None,
        ),
        tool_answer([lr("0.06")]),
        tool_answer([lr("0.02")]),
    )
    strategy = make(model="claude-opus-4-8")
    assert len(await strategy.propose(make_request(k=1))) == 1
    assert len(await strategy.propose(make_request(k=1))) == 1
    assert [r["tool_choice"]["type"] for r in fake.requests] == ["tool", "auto", "auto"]
    assert strategy.failed == 0


# --- repair rounds -------------------------------------------------------------------------


async def test_malformed_tool_input_gets_one_repair_round(fake: FakeAnthropic, make: Make) -> None:
    fake.push(
        raw_input_answer({"variantz": []}, thinking="let me think"),
        tool_answer([lr("0.06"), depth(6)]),
    )
    strategy = make()
    proposals = await strategy.propose(make_request(k=2))
    assert [p.title for p in proposals] == ["MATRIX_LR -> 0.06", "DEPTH -> 6"]
    first_answer = fake.answers[0][1]["content"]
    repair = fake.requests[1]
    assert repair["messages"][1]["role"] == "assistant"
    assert [b["type"] for b in repair["messages"][1]["content"]] == ["thinking", "tool_use"]
    (result,) = last_user_blocks(repair)
    assert result["type"] == "tool_result" and result["tool_use_id"] == first_answer[1]["id"]
    assert result["is_error"] is True
    assert "no `variants` list" in result["content"] and "exactly 2 variants" in result["content"]
    assert (strategy.requests, strategy.waves, strategy.repaired, strategy.failed) == (2, 1, 2, 0)


async def test_unusable_twice_returns_nothing_without_crashing(
    fake: FakeAnthropic, make: Make
) -> None:
    fake.push(raw_input_answer("not an object"), text_answer("I would rather chat."))
    strategy = make()
    assert await strategy.propose(make_request()) == []
    assert len(fake.requests) == 2
    assert strategy.failed == 1 and strategy.requests == 2


async def test_answer_without_tool_call_is_asked_again(fake: FakeAnthropic, make: Make) -> None:
    fake.push(text_answer("Here are some ideas..."), tool_answer([lr("0.06")]))
    assert len(await make().propose(make_request(k=1))) == 1
    (block,) = last_user_blocks(fake.requests[1])
    assert block["type"] == "text" and f"did not call {TOOL_NAME}" in block["text"]


async def test_rejected_edits_go_back_with_reasons(fake: FakeAnthropic, make: Make) -> None:
    missing = variant("bogus", [("MATRIX_LR = 0.05", "MATRIX_LR = 0.07")])
    ambiguous = variant("ambiguous", [("LR", "XX")])
    harness = variant("fake result", [('print("---")', 'print("---")\nprint("val_bpb: 0.5")')])
    fake.push(
        tool_answer([lr("0.06"), missing, lr("0.06"), ambiguous, harness]),
        tool_answer([lr("0.03"), depth(8), depth(2), depth(3)]),
    )
    strategy = make()
    proposals = await strategy.propose(make_request(k=5))
    assert [p.title for p in proposals] == [
        "MATRIX_LR -> 0.06",
        "MATRIX_LR -> 0.03",
        "DEPTH -> 8",
        "DEPTH -> 2",
        "DEPTH -> 3",
    ]
    (result,) = last_user_blocks(fake.requests[1])
    text = result["content"]
    assert "'bogus': edit 1: `old` not found in the parent source" in text
    assert "same source as 'MATRIX_LR -> 0.06' in this wave" in text
    assert "'ambiguous': edit 1: `old` found 2 times" in text
    assert "'fake result': writes a literal result for 'val_bpb'" in text
    assert "Accepted (1): 'MATRIX_LR -> 0.06'" in text and "Propose exactly 4 replacement" in text
    assert (strategy.rejected, strategy.repaired, strategy.dropped) == (4, 4, 0)


async def test_duplicates_are_never_returned(fake: FakeAnthropic, make: Make) -> None:
    known = variant_id_for(CAMPAIGN, PARENT.replace("DEPTH = 4", "DEPTH = 6"))
    noop = variant("no-op", [("DEPTH = 4", "DEPTH = 4")])
    fake.push(tool_answer([depth(6), noop, lr("0.06")]), tool_answer([depth(6), lr("0.06")]))
    strategy = make()
    proposals = await strategy.propose(make_request(k=3, known_ids={known}))
    assert [p.title for p in proposals] == ["MATRIX_LR -> 0.06"]
    assert strategy.dropped == 2 and strategy.rejected == 4
    # The next wave may not repeat it either, even before the history knows it.
    fake.push(tool_answer([lr("0.06"), lr("0.01")]))
    proposals = await strategy.propose(make_request(k=1, known_ids={known}))
    assert [p.title for p in proposals] == ["MATRIX_LR -> 0.01"]
    ids = [
        variant_id_for(CAMPAIGN, PARENT.replace("MATRIX_LR = 0.04", f"MATRIX_LR = {v}"))
        for v in ("0.06", "0.01")
    ]
    assert len(set(ids)) == 2


# --- transport: retries, timeouts, refusals -------------------------------------------------


async def test_429_and_529_are_retried(fake: FakeAnthropic, make: Make) -> None:
    fake.push(rate_limited(0.05), overloaded(), error(500, "api_error"), tool_answer([lr("0.06")]))
    strategy = make()
    assert len(await strategy.propose(make_request(k=1))) == 1
    assert len(fake.requests) == 4
    assert [h["x-stainless-retry-count"] for h in fake.headers] == ["0", "1", "2", "3"]
    assert strategy.requests == 1 and strategy.failed == 0


async def test_persistent_overload_fails_the_request_not_the_strategy(
    fake: FakeAnthropic, make: Make
) -> None:
    fake.push(*[overloaded() for _ in range(5)])
    strategy = make()
    assert await strategy.propose(make_request()) == []
    assert len(fake.requests) == 5 and strategy.failed == 1
    fake.push(tool_answer([lr("0.06")]))
    assert len(await strategy.propose(make_request(k=1))) == 1


async def test_timeouts_are_retried_then_survived(
    fake: FakeAnthropic, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIGHTSHIFT_CLAUDE_TIMEOUT_S", "0.3")
    monkeypatch.setenv("NIGHTSHIFT_CLAUDE_MAX_RETRIES", "1")
    strategy = make()
    fake.push(slow(1.0), tool_answer([lr("0.06")]))  # one timeout, then the SDK's retry answers
    assert len(await strategy.propose(make_request(k=1))) == 1
    fake.push(slow(1.0), slow(1.0))  # every attempt times out: the wave fails, nothing crashes
    assert await strategy.propose(make_request(k=1)) == []
    assert strategy.failed == 1 and len(fake.requests) == 4


async def test_a_refused_key_halts_with_a_clear_reason(fake: FakeAnthropic, make: Make) -> None:
    fake.push(error(401, "authentication_error", "invalid x-api-key", retry_after_ms=None))
    with pytest.raises(ClaudeUnavailable, match="rejected the API key"):
        await make().propose(make_request())


# --- the key ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("fake")
def test_no_key_means_no_strategy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    assert build_claude_strategy(Settings(), campaign()) is None


async def test_key_file_is_used_and_never_logged(
    fake: FakeAnthropic,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    key_file = tmp_path / ".config" / "nightshift" / "anthropic_key"
    key_file.parent.mkdir(parents=True)
    key_file.write_text("sk-from-file-456\n")
    key_file.chmod(0o600)
    strategy = build_claude_strategy(Settings(), campaign())
    assert strategy is not None
    fake.push(tool_answer([lr("0.06"), variant("bad", [("nope", "x")])]), tool_answer([depth(6)]))
    await strategy.propose(make_request(k=2))
    assert fake.headers[0]["authorization"] == "Bearer sk-from-file-456"
    out = capsys.readouterr()
    assert "claude_request_done" in out.out + out.err
    assert "sk-from-file-456" not in out.out + out.err + repr(strategy) + str(strategy.counters())
    other = tmp_path / "elsewhere"
    other.write_text("sk-other")
    monkeypatch.setenv("NIGHTSHIFT_ANTHROPIC_KEY_FILE", str(other))
    assert build_claude_strategy(Settings(), campaign()) is not None


# --- auto mode (for whole campaigns against the fake) -------------------------------------------


async def test_auto_mode_answers_any_wave_with_fresh_valid_variants(
    fake: FakeAnthropic, make: Make
) -> None:
    fake.auto = True
    strategy = make()
    seen: set[str] = set()
    for wave in range(1, 4):
        proposals = await strategy.propose(make_request(k=4, wave=wave, known_ids=set(seen)))
        assert len(proposals) == 4
        seen |= {variant_id_for(CAMPAIGN, p.source) for p in proposals}
    assert len(seen) == 12 and strategy.rejected == 0
    usage = fake.answers[-1][1]["usage"]
    assert usage["cache_read_input_tokens"] == 0  # the toy prompt is under the cacheable minimum
    assert "Wave size K: 4" in request_text(fake.requests[-1])
