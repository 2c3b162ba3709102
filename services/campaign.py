"""Starting and stopping a campaign on a running deployment (used by the CLI and `up`)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import msgspec

from services.bus import Bus
from services.contracts import (
    CampaignStarted,
    CampaignStopped,
    ProposerConfig,
    RunCancel,
    event_id_for,
    harness_tar,
)
from services.settings import Settings


class CampaignError(ValueError):
    """A campaign that cannot start as asked (missing trainer, bad name, ...)."""


def campaign_event(settings: Settings, seed_digest: str, harness_key: str) -> CampaignStarted:
    return CampaignStarted(
        campaign=settings.campaign,
        event_id=event_id_for("started", settings.campaign, seed_digest, settings.max_experiments),
        seed_digest=seed_digest,
        harness_key=harness_key,
        tiers=[t.strip() for t in settings.tiers.split(",") if t.strip()] or [settings.tier],
        # ProposerConfig's fields are all settings of the same name.
        proposer=msgspec.convert(settings, ProposerConfig, from_attributes=True),
        trainer_dir=settings.trainer_dir,
        edit_file=settings.edit_file,
        metric=settings.metric,
        direction=settings.direction,
        profile=settings.profile,
        max_experiments=settings.max_experiments,
        run_timeout_s=settings.run_timeout_s,
        keep_rule=settings.keep_rule,
        confirm_jump=settings.confirm_jump,
        keep_confidence=settings.keep_confidence,
        keep_max_runs=settings.keep_max_runs,
        noise_runs=settings.noise_runs,
    )


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise CampaignError(
            f"campaign name {name!r} must be letters, digits, '-' or '_' (it is part of "
            "NATS keys and run ids)"
        )


async def start_campaign(bus: Bus, settings: Settings) -> tuple[CampaignStarted, bool]:
    """Start the campaign named in settings, or resume it; returns (event, resumed)."""
    _check_name(settings.campaign)
    trainer = Path(settings.trainer_dir)
    seed_path = trainer / settings.edit_file
    if not seed_path.is_file():
        raise CampaignError(
            f"{seed_path} not found: --trainer must name a directory holding the file the "
            f"researcher edits ({settings.edit_file})"
        )
    existing = await bus.campaigns.load(settings.campaign)
    stopped = await bus.campaigns.is_stopped(settings.campaign)
    if existing is not None and not stopped:
        return existing, True
    seed = seed_path.read_text()
    seed_digest = await bus.put_source(seed)
    tar = harness_tar(trainer, settings.edit_file)
    harness_key = "harness-" + hashlib.sha256(tar).hexdigest()[:32]
    await bus.sources.put(harness_key, tar)
    event = campaign_event(settings, seed_digest, harness_key)
    if existing is not None:
        # A stopped campaign started again: same seed and history, new limits.
        event = await _restart(
            bus, msgspec.structs.replace(event, seed_digest=existing.seed_digest)
        )
        return event, True
    await bus.campaigns.save(event)
    await bus.publish(event)
    return event, False


async def _restart(bus: Bus, config: CampaignStarted) -> CampaignStarted:
    """Start a stopped campaign again with `config`: a new CampaignStarted (its own id and
    time), the stopped mark cleared; the proposer picks its history up where it was."""
    ts = time.time()
    event = msgspec.structs.replace(
        config, ts=ts, event_id=event_id_for("restarted", config.campaign, ts)
    )
    await bus.campaigns.clear_stopped(config.campaign)
    await bus.campaigns.save(event)
    await bus.publish(event)
    return event


async def resume_campaign(bus: Bus, name: str) -> bool:
    """Start a stopped campaign again as it was configured (same seed, trainer and limits:
    a completed one completes again unless its limit was raised with `campaign start`).
    False when it was not stopped (nothing is published)."""
    existing = await bus.campaigns.load(name)
    if existing is None:
        raise CampaignError(f"no campaign named {name!r} on this deployment")
    if not await bus.campaigns.is_stopped(name):
        return False
    await _restart(bus, existing)
    return True


async def stop_campaign(bus: Bus, name: str, reason: str = "stopped", detail: str = "") -> bool:
    """Stop proposing and cancel the campaign's runs; its history stays in the ledger.
    False when it was already stopped (nothing is published)."""
    if await bus.campaigns.load(name) is None:
        raise CampaignError(f"no campaign named {name!r} on this deployment")
    if await bus.campaigns.is_stopped(name):
        return False
    await bus.campaigns.mark_stopped(name, reason)
    event = CampaignStopped(
        campaign=name, reason=reason, detail=detail or "stopped by `nightshift campaign stop`"
    )
    # One id per stop request (a later restart may be stopped again).
    await bus.publish(
        msgspec.structs.replace(event, event_id=event_id_for("user-stop", name, event.ts))
    )
    await bus.publish(RunCancel(campaign=name, run_id="*", reason=reason))
    return True
