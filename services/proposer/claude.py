"""The `claude` strategy: waves of variants from the Anthropic Messages API, through tool use.

One request per wave: the rules and program.md (system, cached), the parent source (cached),
then the results, what is in flight, the fleet and K; the model answers by calling one tool
with a list of variants, each a list of exact-substring edits. Every variant is validated
before anything is published; rejected ones (and an unusable answer) go back to the model
once, in the same conversation, with the reasons; what still fails is dropped and logged.
Tokens of every request (repair rounds included) are priced and spread evenly over the
variants the request published. A campaign budget in dollars or in requests stops proposing.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import anthropic

from services.apikey import load_api_key
from services.contracts import CampaignStarted, variant_id_for
from services.proposer.messages import (
    ClaudeConfig,
    Round,
    ToolCaller,
    error_text,
    read_round,
    unavailable_text,
)
from services.proposer.pricing import (
    DEFAULT_MODEL,
    NO_FORCED_TOOL_CHOICE,
    Budget,
    PriceError,
    Usage,
    parse_price,
    price_for,
    split_cost,
)
from services.proposer.prompt import (
    Candidate,
    malformed_text,
    repair_text,
    repair_turn,
    system_blocks,
    user_content,
)
from services.proposer.strategy import Proposal, ProposalRequest, StrategyExhausted
from services.proposer.validate import MAX_SOURCE_BYTES, build_variant
from services.settings import Settings
from services.telemetry import get_logger

MAX_EDIT_CHARS = 20_000  # of `new` text per variant: a variant is an edit, not a rewrite

# What building the strategy may raise: a price setting that cannot be read, a key file that
# cannot be, a client configuration the SDK refuses.
SETUP_ERRORS: tuple[type[Exception], ...] = (PriceError, OSError, anthropic.AnthropicError)


class ClaudeUnavailable(StrategyExhausted):
    """The API refuses this configuration for good (bad key, no access, unknown model)."""


@dataclass
class _Wave:
    """The state of one proposal request across its (at most two) rounds."""

    request: ProposalRequest
    seen: set[str]  # variant ids that may not be proposed again
    accepted: list[tuple[Candidate, str]] = field(default_factory=list)  # (candidate, source)
    usage: Usage = field(default_factory=Usage)
    usd: float = 0.0


class ClaudeStrategy:
    """Proposes waves with Claude. Counters: requests, waves, rejected, repaired, dropped, failed."""

    name = "claude"

    def __init__(
        self, client: anthropic.AsyncAnthropic, config: ClaudeConfig, campaign: str
    ) -> None:
        self.config = config
        self.campaign = campaign
        self._lock = asyncio.Lock()
        self._log = get_logger(campaign=campaign, strategy="claude", model=config.model)
        self._caller = ToolCaller(client, config, self._log)
        self.requests = 0  # API calls answered (billed), repair rounds included
        self.waves = 0  # proposal requests that reached the model
        self.rejected = 0  # variants rejected by validation, any round
        self.repaired = 0  # replacement variants accepted from a repair round
        self.dropped = 0  # variants that still failed when no repair was left
        self.failed = 0  # calls that failed (errors, timeouts) and unusable answers
        self.spent_usd = 0.0  # by this process
        self.budget = Budget(campaign, config.budget_usd, config.budget_requests)

    def __repr__(self) -> str:  # never the client: it holds the key
        return f"ClaudeStrategy(campaign={self.campaign!r}, model={self.config.model!r})"

    def counters(self) -> dict[str, float | int]:
        return {
            "requests": self.requests,
            "waves": self.waves,
            "rejected": self.rejected,
            "repaired": self.repaired,
            "dropped": self.dropped,
            "failed": self.failed,
            "spent_usd": round(self.spent_usd, 6),
        }

    def campaign_spend(self, request: ProposalRequest) -> tuple[float, int]:
        """(usd, waves) spent on this campaign: the history's figures plus what it lacks yet."""
        return self.budget.spent(request.spent_usd, request.requests_made, request.known_ids)

    # --- proposing --------------------------------------------------------------------

    async def propose(self, request: ProposalRequest) -> list[Proposal]:
        async with self._lock:
            self.budget.check(request.spent_usd, request.requests_made, request.known_ids)
            return await self._propose(request)

    async def _propose(self, request: ProposalRequest) -> list[Proposal]:
        system = system_blocks(
            request.program,
            metric=request.metric,
            direction=request.direction,
            edit_file=request.edit_file,
        )
        messages: list[dict[str, Any]] = [{"role": "user", "content": user_content(request)}]
        wave = _Wave(request, set(request.known_ids) | set(self.budget.returned))
        first = await self._call(system, messages, wave, round_no=1)
        if first is None:
            return []
        self.waves += 1
        rejected = self._screen(first, wave, round_no=1)
        wanted = request.k - len(wave.accepted)
        if (rejected or first.unusable) and wanted > 0:
            messages += [
                {"role": "assistant", "content": first.content},
                {
                    "role": "user",
                    "content": repair_turn(
                        first.tool_use_ids, self._repair_text(first, wave, rejected, wanted)
                    ),
                },
            ]
            second = await self._call(system, messages, wave, round_no=2)
            if second is None:
                self.dropped += len(rejected)
            else:
                before = len(wave.accepted)
                self.dropped += len(self._screen(second, wave, round_no=2))
                self.repaired += len(wave.accepted) - before
                if second.unusable and not wave.accepted:
                    self.failed += 1
        else:
            self.dropped += len(rejected)
        return self._publish(wave)

    @staticmethod
    def _repair_text(
        rnd: Round, wave: _Wave, rejected: list[tuple[str, list[str]]], wanted: int
    ) -> str:
        if rnd.unusable and not rnd.candidates:
            return malformed_text(rnd.unusable, wanted)
        return repair_text([c.title for c, _ in wave.accepted], rejected, wanted)

    def _screen(self, rnd: Round, wave: _Wave, round_no: int) -> list[tuple[str, list[str]]]:
        """Validate a round's candidates into wave.accepted; return the rejected ones."""
        request = wave.request
        rejected: list[tuple[str, list[str]]] = []
        wave_ids: dict[str, str] = {}
        for cand in rnd.candidates:
            if len(wave.accepted) >= request.k:
                self._log.info("variant_surplus", title=cand.title, round=round_no)
                continue
            source, reasons = self._check(cand, wave, wave_ids)
            if source is None:
                rejected.append((cand.title, reasons))
                self.rejected += 1
                self._log.info(
                    "variant_rejected",
                    title=cand.title,
                    reason="; ".join(reasons),
                    round=round_no,
                    wave=request.wave,
                )
                continue
            wave.accepted.append((cand, source))
        return rejected

    def _check(
        self, cand: Candidate, wave: _Wave, wave_ids: dict[str, str]
    ) -> tuple[str | None, list[str]]:
        if cand.problems:
            return None, cand.problems
        size = sum(len(e.new) for e in cand.edits)
        if size > MAX_EDIT_CHARS:
            return None, [
                f"edits add {size} characters, over the {MAX_EDIT_CHARS} limit; "
                "make a smaller, focused change"
            ]
        request = wave.request
        source, reasons = build_variant(
            request.parent_source,
            cand.edits,
            campaign=request.campaign,
            known_ids=wave.seen - set(wave_ids),
            max_bytes=MAX_SOURCE_BYTES,
            filename=request.edit_file,
        )
        if source is None:
            return None, reasons
        vid = variant_id_for(request.campaign, source)
        if vid in wave_ids:
            return None, [f"same source as {wave_ids[vid]!r} in this wave"]
        wave_ids[vid] = cand.title
        wave.seen.add(vid)
        return source, []

    def _publish(self, wave: _Wave) -> list[Proposal]:
        request = wave.request
        n = len(wave.accepted)
        if n == 0:
            self.budget.unpublished(wave.usd)
            self._log.warning(
                "claude_wave_empty",
                wave=request.wave,
                usd=round(wave.usd, 6),
                counters=self.counters(),
            )
            return []
        cost = split_cost(self.config.model, wave.usage, wave.usd, n)
        proposals = [
            Proposal(
                title=cand.title,
                source=source,
                parent_id=request.parent_id,
                rationale=cand.hypothesis,
                llm_cost=cost,
            )
            for cand, source in wave.accepted
        ]
        self.budget.published(
            {variant_id_for(request.campaign, p.source) for p in proposals}, cost.usd
        )
        self._log.info(
            "claude_wave_done",
            wave=request.wave,
            variants=n,
            asked=request.k,
            usd=round(wave.usd, 6),
            usage=wave.usage.as_dict(),
            counters=self.counters(),
        )
        return proposals

    # --- the API ----------------------------------------------------------------------

    async def _call(
        self,
        system: list[dict[str, Any]],
        messages: list[dict[str, Any]],
        wave: _Wave,
        round_no: int,
    ) -> Round | None:
        """One Messages API call (the SDK retries 429/5xx/529 and timeouts); None on failure."""
        started = time.monotonic()
        try:
            message = await self._caller.create(system, messages)
        except (
            anthropic.AuthenticationError,
            anthropic.PermissionDeniedError,
            anthropic.NotFoundError,
        ) as exc:
            self.failed += 1
            raise ClaudeUnavailable(unavailable_text(exc, self.config.model)) from exc
        except anthropic.APIStatusError as exc:
            self.failed += 1
            self._log.warning(
                "claude_request_failed",
                status=exc.status_code,
                round=round_no,
                error=error_text(exc),
                request_id=exc.request_id,
            )
            return None
        except anthropic.APIConnectionError as exc:  # timeouts included, after the retries
            self.failed += 1
            self._log.warning(
                "claude_request_failed",
                status=None,
                round=round_no,
                error=type(exc).__name__,
                detail=str(exc)[:200],
            )
            return None
        rnd = read_round(message, self.config)
        self.requests += 1
        self.spent_usd += rnd.usd
        wave.usage += rnd.usage
        wave.usd += rnd.usd
        self._log.info(
            "claude_request_done",
            round=round_no,
            wave=wave.request.wave,
            stop_reason=message.stop_reason,
            usage=rnd.usage.as_dict(),
            usd=round(rnd.usd, 6),
            seconds=round(time.monotonic() - started, 2),
            candidates=len(rnd.candidates),
            unusable=rnd.unusable or None,
        )
        return rnd


# --- construction ---------------------------------------------------------------------


def build_claude_strategy(settings: Settings, campaign: CampaignStarted) -> ClaudeStrategy | None:
    """The claude strategy for a campaign, or None when no API key is configured."""
    key = load_api_key()
    if key is None:
        return None
    proposer = campaign.proposer
    model = proposer.model or settings.model or DEFAULT_MODEL
    price_text = settings.claude_price
    price, known = price_for(model, parse_price(price_text) if price_text else None)
    log = get_logger(campaign=campaign.campaign, strategy="claude", model=model)
    if not known:
        log.warning(
            "claude_model_unpriced",
            assumed_usd_per_mtok={"input": price.input, "output": price.output},
            fix="set NIGHTSHIFT_CLAUDE_PRICE='input,output' ($ per million tokens)",
        )
    config = ClaudeConfig(
        model=model,
        budget_usd=proposer.budget_usd or settings.budget_usd,
        budget_requests=proposer.budget_requests or settings.budget_requests,
        max_tokens=settings.claude_max_tokens,
        effort=settings.claude_effort,
        price=price,
    )
    client = anthropic.AsyncAnthropic(
        api_key=key, max_retries=settings.claude_max_retries, timeout=settings.claude_timeout_s
    )
    log.info(
        "claude_strategy_ready",
        budget_usd=config.budget_usd,
        budget_requests=config.budget_requests,
        forced_tool=model not in NO_FORCED_TOOL_CHOICE,
    )
    return ClaudeStrategy(client, config, campaign.campaign)
