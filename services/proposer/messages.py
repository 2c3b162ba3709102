"""One round of the Messages API for the claude strategy: the call with the proposal tool,
and what its answer holds (tokens, price, candidates, or why it cannot be used)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anthropic

from services.proposer.pricing import (
    DEFAULT_MODEL,
    NO_FORCED_TOOL_CHOICE,
    ModelPrice,
    Usage,
    price_for,
    request_cost,
)
from services.proposer.prompt import TOOL, TOOL_NAME, Candidate, parse_variants


@dataclass(frozen=True)
class ClaudeConfig:
    model: str = DEFAULT_MODEL
    budget_usd: float = 0.0  # 0: no cap
    budget_requests: int = 0  # proposal requests (waves); 0: no cap
    max_tokens: int = 32_000  # the answer, thinking included
    effort: str = ""  # output_config.effort; "" = the model's default
    price: ModelPrice = field(default_factory=lambda: price_for(DEFAULT_MODEL)[0])


@dataclass
class Round:
    """One API call of a wave and what came back."""

    content: list[Any]
    usage: Usage
    usd: float
    tool_use_ids: list[str]
    candidates: list[Candidate]
    unusable: str  # why the answer could not be used ("" when it could)


class ToolCaller:
    """Asks the model to call the proposal tool: forced where the model takes a forced
    tool_choice, else (and for good, once a model refuses it with a 400) "auto"."""

    def __init__(self, client: anthropic.AsyncAnthropic, config: ClaudeConfig, log: Any) -> None:
        self._client = client
        self.config = config
        self.forced = config.model not in NO_FORCED_TOOL_CHOICE
        self._log = log

    async def create(self, system: list[dict[str, Any]], messages: list[dict[str, Any]]) -> Any:
        """The model's message; the SDK's errors (after its own retries) propagate."""
        kwargs: dict[str, Any] = {
            "model": self.config.model,
            "max_tokens": self.config.max_tokens,
            "system": system,
            "messages": messages,
            "tools": [TOOL],
        }
        if self.config.effort:
            kwargs["output_config"] = {"effort": self.config.effort}
        if self.forced:
            try:
                return await self._client.messages.create(
                    **kwargs, tool_choice={"type": "tool", "name": TOOL_NAME}
                )
            except anthropic.BadRequestError as exc:
                if "tool_choice" not in error_text(exc):
                    raise
                self.forced = False
                self._log.warning("claude_forced_tool_choice_refused", error=error_text(exc))
        return await self._client.messages.create(**kwargs, tool_choice={"type": "auto"})


def read_round(message: Any, config: ClaudeConfig) -> Round:
    """Tokens, price and candidates of an answer, or why it cannot be used."""
    u = message.usage
    usage = Usage(
        u.input_tokens or 0,
        u.cache_creation_input_tokens or 0,
        u.cache_read_input_tokens or 0,
        u.output_tokens or 0,
    )
    usd = request_cost(usage, config.price)
    uses = [b for b in message.content if b.type == "tool_use" and b.name == TOOL_NAME]
    candidates: list[Candidate] = []
    unusable = ""
    for block in uses:
        found, why = parse_variants(block.input)
        candidates += found
        unusable = unusable or why
    if not uses:
        unusable = f"you did not call {TOOL_NAME} (stop_reason {message.stop_reason})"
    if message.stop_reason == "max_tokens":
        unusable = (
            f"the answer was cut off at the {config.max_tokens}-token limit; "
            "propose the variants with shorter edits"
        )
        candidates = []
    elif candidates:
        unusable = ""
    content = [_echo(b) for b in message.content]
    return Round(content, usage, usd, [b.id for b in uses], candidates, unusable)


def _echo(block: Any) -> Any:
    """A block of the answer as it goes back in a repair round (a tool input must be an object)."""
    if block.type == "tool_use" and not isinstance(block.input, dict):
        return {
            "type": "tool_use",
            "id": block.id,
            "name": block.name,
            "input": {"unreadable": str(block.input)[:2000]},
        }
    return block


def error_text(exc: anthropic.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return f"{err.get('type', '')}: {err.get('message', '')}"[:300]
    return str(exc.message)[:300]


def unavailable_text(exc: anthropic.APIStatusError, model: str) -> str:
    what = {
        401: "rejected the API key (401): check ANTHROPIC_API_KEY or the key file",
        403: "refused access (403): the key's organisation may not use this model or API",
        404: f"does not know the model {model!r} (404): set NIGHTSHIFT_MODEL to a current one "
        "(or fix ANTHROPIC_BASE_URL)",
    }.get(exc.status_code, f"refused the request ({exc.status_code})")
    return f"the Anthropic API {what} [{error_text(exc)}]"
