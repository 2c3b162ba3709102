"""Which strategy proposes for a campaign: grid, claude, or `auto` (claude when an Anthropic
API key is configured here, else grid). A strategy that cannot run falls back to grid and
says why, once per campaign start."""

from __future__ import annotations

from services.apikey import load_api_key
from services.contracts import CampaignStarted
from services.proposer.grid import GridStrategy
from services.proposer.strategy import Strategy
from services.settings import Settings
from services.telemetry import get_logger

log = get_logger(service="proposer")


def build_strategy(settings: Settings, campaign: CampaignStarted, warned: set[str]) -> Strategy:
    """The campaign's strategy; `warned` holds what was already said for this campaign.

    Blocking (importing the Anthropic SDK takes seconds): call it in a thread.
    """
    clog = log.bind(campaign=campaign.campaign)
    name = campaign.proposer.strategy or settings.strategy
    if name == "auto":
        name = "claude" if load_api_key() else "grid"
        clog.info("strategy_chosen", strategy=name)
    if name == "claude":
        claude, why = _claude_strategy(settings, campaign)
        if claude is not None:
            return claude
        if "claude" not in warned:
            warned.add("claude")
            clog.warning("claude_unavailable_using_grid", reason=why)
    elif name != "grid" and name not in warned:
        warned.add(name)
        clog.warning("unknown_strategy_using_grid", strategy=name)
    return GridStrategy(profile=campaign.profile)


def _claude_strategy(settings: Settings, campaign: CampaignStarted) -> tuple[Strategy | None, str]:
    """(the claude strategy, "") or (None, why it cannot run)."""
    try:
        # Imported here: the Anthropic SDK takes seconds to import.
        from services.proposer.claude import SETUP_ERRORS, build_claude_strategy
    except ImportError as exc:
        return None, f"the Anthropic SDK cannot be imported: {exc}"
    try:
        built = build_claude_strategy(settings, campaign)
    except SETUP_ERRORS as exc:  # a bad price setting, an unreadable key file, ...
        return None, str(exc)
    if built is None:
        return None, "no Anthropic API key (set ANTHROPIC_API_KEY or a secrets file)"
    return built, ""
