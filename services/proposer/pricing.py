"""What Claude tokens cost: $ per million tokens, by model, and the cost of a request.

Prices are Anthropic's published list prices (platform.claude.com/docs/en/about-claude/pricing,
checked November 2026) for the models the installed SDK names in `anthropic.types.ModelParam`.
Cache writes are the 5-minute ones (what `cache_control: {"type": "ephemeral"}` buys).
A model missing here is priced at `NIGHTSHIFT_CLAUDE_PRICE` ("input,output" $/MTok; cache
write 1.25x and cache read 0.1x input) or, failing that, at UNKNOWN_MODEL_PRICE, a
deliberately high figure so a budget stops early rather than late; either way a warning says so.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, field

from services.contracts import LlmCost
from services.proposer.strategy import BudgetExhausted

DEFAULT_MODEL = "claude-sonnet-5-5"


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens."""

    input: float
    output: float
    cache_write: float
    cache_read: float
    # Some models charge more for every token of a request whose prompt (input + cache
    # reads + cache writes) is longer than a threshold (Haiku 5.5: 100k tokens).
    long_prompt_threshold: int = 0
    long_prompt: ModelPrice | None = None

    @classmethod
    def standard(cls, input_usd: float, output_usd: float) -> ModelPrice:
        """The usual shape: cache write 1.25x input, cache read 0.1x input."""
        return cls(input_usd, output_usd, input_usd * 1.25, input_usd * 0.1)


def _p(i: float, o: float, w: float, r: float) -> ModelPrice:
    return ModelPrice(i, o, w, r)


_FABLE_5_2 = _p(8.0, 40.0, 10.0, 0.20)
_FABLE_5_1 = _p(10.0, 50.0, 12.50, 0.25)
_FABLE_5 = _p(10.0, 50.0, 12.50, 1.00)
_OPUS_5_5 = _p(4.0, 20.0, 5.0, 0.20)
_OPUS_4_5_TO_5 = _p(5.0, 25.0, 6.25, 0.50)
_SONNET_5_5 = _p(2.0, 10.0, 2.50, 0.10)  # cache read cut from $0.20 on 2026-10-07
_SONNET_5 = _p(2.0, 10.0, 2.50, 0.20)
_SONNET_4 = _p(3.0, 15.0, 3.75, 0.30)
_HAIKU_5_5 = ModelPrice(
    0.10, 0.50, 0.125, 0.01, long_prompt_threshold=100_000, long_prompt=_p(0.50, 2.50, 0.625, 0.05)
)
_HAIKU_4_5 = _p(1.0, 5.0, 1.25, 0.10)

PRICES: dict[str, ModelPrice] = {
    "claude-fable-5-2": _FABLE_5_2,
    "claude-mythos-5-2": _FABLE_5_2,
    "claude-fable-5-1": _FABLE_5_1,
    "claude-mythos-5-1": _FABLE_5_1,
    "claude-fable-5": _FABLE_5,
    "claude-mythos-5": _FABLE_5,
    "claude-opus-5-5": _OPUS_5_5,
    "claude-opus-5": _OPUS_4_5_TO_5,
    "claude-opus-4-8": _OPUS_4_5_TO_5,
    "claude-opus-4-7": _OPUS_4_5_TO_5,
    "claude-opus-4-6": _OPUS_4_5_TO_5,
    "claude-opus-4-5": _OPUS_4_5_TO_5,
    "claude-opus-4-5-20251101": _OPUS_4_5_TO_5,
    "claude-sonnet-5-5": _SONNET_5_5,
    "claude-sonnet-5": _SONNET_5,
    "claude-sonnet-4-6": _SONNET_4,
    "claude-sonnet-4-5": _SONNET_4,
    "claude-sonnet-4-5-20250929": _SONNET_4,
    "claude-haiku-5-5": _HAIKU_5_5,
    "claude-haiku-4-5": _HAIKU_4_5,
    "claude-haiku-4-5-20251001": _HAIKU_4_5,
}

# Priced like the most expensive current model, so an unknown model cannot overspend a budget.
UNKNOWN_MODEL_PRICE = _FABLE_5_1

# Models that answer a forced tool_choice ({"type": "tool"} or "any") with a 400: the
# strategy asks them with tool_choice "auto" and an explicit instruction instead (and
# learns the same at run time from such a 400 for models not listed here).
NO_FORCED_TOOL_CHOICE = frozenset(
    {
        "claude-sonnet-5-5",
        "claude-opus-5-5",
        "claude-fable-5-1",
        "claude-mythos-5-1",
        "claude-fable-5-2",
        "claude-mythos-5-2",
    }
)


class PriceError(ValueError):
    """A price setting that cannot be read."""


def parse_price(text: str) -> ModelPrice:
    """ "3,15" (input, output $/MTok) or "3,15,3.75,0.3" (plus cache write, cache read)."""
    try:
        values = [float(part) for part in text.replace("/", ",").split(",") if part.strip()]
    except ValueError as exc:
        raise PriceError(
            f"NIGHTSHIFT_CLAUDE_PRICE must be numbers like '3,15', got {text!r}"
        ) from exc
    if len(values) == 2:
        return ModelPrice.standard(values[0], values[1])
    if len(values) == 4:
        return ModelPrice(values[0], values[1], values[2], values[3])
    raise PriceError(
        "NIGHTSHIFT_CLAUDE_PRICE takes 'input,output' or 'input,output,cache_write,cache_read' "
        f"in $ per million tokens, got {text!r}"
    )


def price_for(model: str, override: ModelPrice | None = None) -> tuple[ModelPrice, bool]:
    """The price of a model, and whether it is a known (published or configured) one."""
    if override is not None:
        return override, True
    if model in PRICES:
        return PRICES[model], True
    return UNKNOWN_MODEL_PRICE, False


@dataclass(frozen=True)
class Usage:
    """Tokens of one or more requests, as the Messages API reports them."""

    input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.cache_creation_input_tokens + other.cache_creation_input_tokens,
            self.cache_read_input_tokens + other.cache_read_input_tokens,
            self.output_tokens + other.output_tokens,
        )

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "input": self.input_tokens,
            "cache_write": self.cache_creation_input_tokens,
            "cache_read": self.cache_read_input_tokens,
            "output": self.output_tokens,
        }


def request_cost(usage: Usage, price: ModelPrice) -> float:
    """USD of ONE request (the long-prompt band is decided per request)."""
    if price.long_prompt is not None and usage.prompt_tokens > price.long_prompt_threshold:
        price = price.long_prompt
    return (
        usage.input_tokens * price.input
        + usage.cache_creation_input_tokens * price.cache_write
        + usage.cache_read_input_tokens * price.cache_read
        + usage.output_tokens * price.output
    ) / 1_000_000


def split_cost(model: str, usage: Usage, usd: float, n: int) -> LlmCost:
    """One variant's even share of a request that published n variants."""
    n = max(n, 1)
    return LlmCost(
        model=model,
        input_tokens=usage.input_tokens / n,
        cache_creation_input_tokens=usage.cache_creation_input_tokens / n,
        cache_read_input_tokens=usage.cache_read_input_tokens / n,
        output_tokens=usage.output_tokens / n,
        usd=usd / n,
    )


@dataclass
class Budget:
    """A campaign's cap in dollars and in requests (waves), and what counts against it.

    The history (ProposalRequest.spent_usd / requests_made) knows what published variants
    cost, including before a restart; this adds what it does not know yet: variants returned
    but not yet in known_ids, and waves that cost money but published nothing.
    """

    campaign: str
    usd: float = 0.0  # 0: no cap
    requests: int = 0  # 0: no cap
    returned: dict[str, float] = field(default_factory=dict)  # variant id -> its usd share
    returned_waves: list[set[str]] = field(default_factory=list)
    unattributed_usd: float = 0.0
    unattributed_waves: int = 0

    def spent(self, spent_usd: float, requests_made: int, known_ids: Set[str]) -> tuple[float, int]:
        pending_usd = sum(usd for vid, usd in self.returned.items() if vid not in known_ids)
        pending_waves = sum(1 for ids in self.returned_waves if not ids & known_ids)
        return (
            spent_usd + pending_usd + self.unattributed_usd,
            requests_made + pending_waves + self.unattributed_waves,
        )

    def check(self, spent_usd: float, requests_made: int, known_ids: Set[str]) -> None:
        """Raise BudgetExhausted when either cap is reached."""
        usd, waves = self.spent(spent_usd, requests_made, known_ids)
        if self.usd > 0 and usd >= self.usd:
            raise BudgetExhausted(
                f"Claude budget reached for campaign {self.campaign!r}: spent ${usd:.2f} of "
                f"${self.usd:.2f} after {waves} requests; raise NIGHTSHIFT_BUDGET_USD to continue"
            )
        if self.requests > 0 and waves >= self.requests:
            raise BudgetExhausted(
                f"Claude request budget reached for campaign {self.campaign!r}: made {waves} of "
                f"{self.requests} requests (spent ${usd:.2f}); raise NIGHTSHIFT_BUDGET_REQUESTS "
                "to continue"
            )

    def published(self, ids: set[str], usd_each: float) -> None:
        for vid in ids:
            self.returned[vid] = usd_each
        self.returned_waves.append(set(ids))

    def unpublished(self, usd: float) -> None:
        self.unattributed_usd += usd
        self.unattributed_waves += 1
