"""Pricing, budgets, the cost each variant carries, and what a realistic wave costs (run with
-s to see the figures)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.contracts import CampaignStarted, ProposerConfig, variant_id_for
from services.proposer.claude import build_claude_strategy
from services.proposer.pricing import (
    DEFAULT_MODEL,
    PRICES,
    ModelPrice,
    PriceError,
    Usage,
    parse_price,
    price_for,
    request_cost,
    split_cost,
)
from services.proposer.strategy import BudgetExhausted, ProposalRequest, ResultRow
from services.settings import Settings
from tests.anthropic_requests import request_text
from tests.claude_helpers import CAMPAIGN, Make, depth, lr, make_request
from tests.fake_anthropic import FakeAnthropic, tool_answer, variant

TRAINER = Path(__file__).resolve().parent.parent / "trainer"


def test_every_model_of_the_sdk_is_priced_or_known_unpriceable() -> None:
    from typing import get_args

    from anthropic.types.model_param import ModelParam

    names = {n for arg in get_args(ModelParam) for n in get_args(arg)}
    assert names, "the SDK's model list changed shape"
    unpriced = names - set(PRICES)
    assert unpriced <= {"claude-mythos-preview"}, unpriced  # retired preview, no public price
    assert DEFAULT_MODEL in names


def test_request_cost_uses_each_token_kind() -> None:
    price = PRICES["claude-sonnet-5-5"]
    usage = Usage(1_000_000, 1_000_000, 1_000_000, 1_000_000)
    assert request_cost(usage, price) == pytest.approx(2.0 + 2.5 + 0.1 + 10.0)


def test_haiku_5_5_long_prompts_cost_more_on_every_token() -> None:
    price = PRICES["claude-haiku-5-5"]
    short = Usage(input_tokens=90_000, output_tokens=1000)
    long = Usage(input_tokens=10_000, cache_read_input_tokens=95_000, output_tokens=1000)
    assert request_cost(short, price) == pytest.approx((90_000 * 0.10 + 1000 * 0.50) / 1e6)
    assert request_cost(long, price) == pytest.approx(
        (10_000 * 0.5 + 95_000 * 0.05 + 1000 * 2.5) / 1e6
    )


def test_price_settings() -> None:
    standard = parse_price("3,15")
    assert (
        standard.input,
        standard.output,
        standard.cache_write,
        standard.cache_read,
    ) == pytest.approx((3.0, 15.0, 3.75, 0.3))
    assert parse_price("1,2,3,4") == ModelPrice(1.0, 2.0, 3.0, 4.0)
    with pytest.raises(PriceError, match="input,output"):
        parse_price("3")
    with pytest.raises(PriceError):
        parse_price("three,15")
    assert price_for("claude-nope") == (price_for("claude-fable-5-1")[0], False)
    assert price_for("claude-nope", ModelPrice.standard(1, 2))[1] is True


def test_split_cost_is_an_even_share() -> None:
    cost = split_cost("m", Usage(10, 20, 30, 40), 0.9, 3)
    assert (cost.input_tokens, cost.cache_read_input_tokens, cost.usd) == pytest.approx(
        (10 / 3, 10, 0.3)
    )


# --- budget ---------------------------------------------------------------------------------

BIG = {
    "input_tokens": 2000,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 0,
    "output_tokens": 1000,
}  # $0.014 at Sonnet 5.5 prices


async def test_dollar_budget_stops_proposing(fake: FakeAnthropic, make: Make) -> None:
    fake.push(tool_answer([lr("0.06")], usage=BIG))
    strategy = make(Settings(budget_usd=0.01))
    assert len(await strategy.propose(make_request(k=1))) == 1
    with pytest.raises(
        BudgetExhausted, match=r"spent \$0\.01 of \$0\.01 after 1 requests.*NIGHTSHIFT_BUDGET_USD"
    ):
        await strategy.propose(make_request(k=1))
    # A restarted proposer learns the spend from the history and stops before any call.
    fresh = make(budget_usd=0.01)
    with pytest.raises(BudgetExhausted):
        await fresh.propose(make_request(k=1, spent_usd=0.014, requests_made=1))
    assert len(fake.requests) == 1


async def test_request_budget_stops_proposing(fake: FakeAnthropic, make: Make) -> None:
    fake.push(tool_answer([lr("0.06")]))
    strategy = make(budget_requests=1)
    await strategy.propose(make_request(k=1))
    with pytest.raises(BudgetExhausted, match=r"made 1 of 1 requests.*NIGHTSHIFT_BUDGET_REQUESTS"):
        await strategy.propose(make_request(k=1))
    with pytest.raises(BudgetExhausted):
        await make(budget_requests=1).propose(make_request(k=1, requests_made=1))


async def test_spend_is_not_counted_twice_once_the_history_has_it(
    fake: FakeAnthropic, make: Make
) -> None:
    fake.push(tool_answer([lr("0.06"), depth(6)], usage=BIG))
    strategy = make()
    proposals = await strategy.propose(make_request(k=2))
    usd = sum(p.llm_cost.usd for p in proposals if p.llm_cost)
    assert strategy.campaign_spend(make_request()) == pytest.approx((usd, 1))
    ids = {variant_id_for(CAMPAIGN, p.source) for p in proposals}
    in_history = make_request(known_ids=ids, spent_usd=usd, requests_made=1)
    assert strategy.campaign_spend(in_history) == pytest.approx((usd, 1))


# --- cost -----------------------------------------------------------------------------------


async def test_cost_per_variant_sums_to_the_priced_usage(fake: FakeAnthropic, make: Make) -> None:
    first = {
        "input_tokens": 1200,
        "cache_creation_input_tokens": 9000,
        "cache_read_input_tokens": 0,
        "output_tokens": 2500,
    }
    second = {
        "input_tokens": 3800,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 9000,
        "output_tokens": 900,
    }
    bad = variant("bad", [("nope", "x")])
    fake.push(
        tool_answer([lr("0.06"), bad, depth(6)], usage=first), tool_answer([depth(8)], usage=second)
    )
    strategy = make()
    proposals = await strategy.propose(make_request(k=3))
    assert len(proposals) == 3
    # Sonnet 5.5: $2 input, $2.50 cache write, $0.10 cache read, $10 output per million.
    expected = (5000 * 2.0 + 9000 * 2.5 + 9000 * 0.10 + 3400 * 10.0) / 1e6
    costs = [p.llm_cost for p in proposals if p.llm_cost]
    assert len(costs) == 3 and all(c.model == "claude-sonnet-5-5" for c in costs)
    assert sum(c.usd for c in costs) == pytest.approx(expected)
    assert sum(c.input_tokens for c in costs) == pytest.approx(5000)
    assert sum(c.cache_creation_input_tokens for c in costs) == pytest.approx(9000)
    assert sum(c.cache_read_input_tokens for c in costs) == pytest.approx(9000)
    assert sum(c.output_tokens for c in costs) == pytest.approx(3400)
    assert strategy.spent_usd == pytest.approx(expected)


async def test_unknown_model_is_priced_by_setting(
    fake: FakeAnthropic, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIGHTSHIFT_CLAUDE_PRICE", "1,2")
    fake.push(tool_answer([lr("0.06")], usage=BIG))
    strategy = make(model="claude-future-9")
    (proposal,) = await strategy.propose(make_request(k=1))
    assert proposal.llm_cost is not None
    assert proposal.llm_cost.usd == pytest.approx((2000 * 1 + 1000 * 2) / 1e6)


# --- the measurement ---------------------------------------------------------------------

K = 8
THINKING_TOKENS = 4000  # adaptive thinking at Sonnet 5.5's default (high) effort, a guess
CHARS_PER_TOKEN = 3.5


def _results(n: int = 30) -> list[ResultRow]:
    knobs = [
        "MATRIX_LR",
        "EMBEDDING_LR",
        "WEIGHT_DECAY",
        "WARMDOWN_RATIO",
        "DEPTH",
        "ASPECT_RATIO",
        "DEVICE_BATCH_SIZE",
        "ADAM_BETA2",
        "SCALAR_LR",
        "UNEMBEDDING_LR",
    ]
    rows = []
    for i in range(n):
        knob = knobs[i % len(knobs)]
        if i % 7 == 5:
            rows.append(
                ResultRow(
                    f"v{i:02d}",
                    f"{knob} x{1 + i % 3} with longer warmup",
                    "oom",
                    None,
                    crash_reason="torch.OutOfMemoryError: CUDA out of memory. Tried to "
                    "allocate 2.00 GiB",
                    finished_at=float(i),
                )
            )
        else:
            rows.append(
                ResultRow(
                    f"v{i:02d}",
                    f"{knob} -> {0.01 * (i + 1):.3g}",
                    "ok",
                    0.9979 - 0.0004 * (i % 9),
                    finished_at=float(i),
                )
            )
    return rows


@pytest.fixture
def auto_fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeAnthropic]:
    with FakeAnthropic(
        chars_per_token=CHARS_PER_TOKEN, auto_thinking_tokens=THINKING_TOKENS
    ) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.delenv("NIGHTSHIFT_CLAUDE_PRICE", raising=False)
        yield server


async def test_realistic_wave_size_and_cost(auto_fake: FakeAnthropic) -> None:
    source = (TRAINER / "train.py").read_text()
    program = (TRAINER / "program.md").read_text()
    results = _results()
    campaign = CampaignStarted(
        campaign="m", seed_digest="d", harness_key="h", proposer=ProposerConfig(strategy="claude")
    )
    strategy = build_claude_strategy(Settings(), campaign)
    assert strategy is not None
    waves = []
    for wave in (1, 2):
        request = ProposalRequest(
            campaign="m",
            parent_id="v03",
            parent_source=source,
            best_value=0.9967,
            results=results,
            in_flight_titles=[f"in flight {i}" for i in range(6)],
            known_ids=set(),
            k=K,
            wave=wave,
            free_slots={"h100": 6, "h200": 2},
            program=program,
        )
        proposals = await strategy.propose(request)
        assert len(proposals) == K
        waves.append(proposals)
    body = auto_fake.requests[0]
    chars = len(request_text(body))
    cold = Usage(**auto_fake.answers[0][1]["usage"])
    warm = Usage(**auto_fake.answers[1][1]["usage"])
    price = PRICES[DEFAULT_MODEL]
    uncached = Usage(input_tokens=cold.prompt_tokens, output_tokens=cold.output_tokens)
    assert warm.cache_read_input_tokens == cold.cache_creation_input_tokens > 0
    for usage, proposals in zip((cold, warm), waves, strict=True):
        assert sum(p.llm_cost.usd for p in proposals if p.llm_cost) == pytest.approx(
            request_cost(usage, price)
        )
    print(
        f"\nrequest: {chars} characters (train.py {len(source)}, program.md {len(program)}, "
        f"30 results); tokens at {CHARS_PER_TOKEN} chars/token, output incl. {THINKING_TOKENS} thinking"
    )
    for name, usage in (("no caching", uncached), ("cache write", cold), ("cache hit", warm)):
        usd = request_cost(usage, price)
        print(
            f"{name:12s} {usage.as_dict()}  wave of {K}: ${usd:.4f}  per variant: ${usd / K:.5f} "
            f"({usage.prompt_tokens / K:.0f} prompt + {usage.output_tokens / K:.0f} output tokens)"
        )
    assert request_cost(warm, price) < request_cost(cold, price)
