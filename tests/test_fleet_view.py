"""The fleet as the proposer and the ledger see it: several launchers of one tier summed,
a silent one dropped within `ack_wait_s`, and the `nightshift status` line."""

from __future__ import annotations

from services.contracts import FleetStatus
from services.ledger.overview import FleetWatch
from services.ledger_client import format_fleet
from services.proposer.fleet import fleet_expiry


def status(launcher: str, tier: str, slots: int, busy: int, queued: int) -> FleetStatus:
    return FleetStatus(
        campaign="*", launcher_id=launcher, slots={tier: slots}, busy={tier: busy}, queued=queued
    )


def test_launchers_of_a_tier_are_summed_and_their_shared_queue_counted_once() -> None:
    watch = FleetWatch(expiry_s=4.0)
    watch.update(status("a", "screen", 2, 2, 5), now=0.0)
    watch.update(status("b", "screen", 4, 1, 5), now=0.0)  # the same durable's 5 waiting
    watch.update(status("c", "validate", 1, 1, 2), now=0.0)
    tiers = {t.tier: t for t in watch.tiers(1.0)}
    assert (tiers["screen"].slots, tiers["screen"].busy, tiers["screen"].launchers) == (6, 3, 2)
    assert (tiers["validate"].slots, tiers["validate"].launchers) == (1, 1)
    assert watch.queued(1.0) == 5 + 2
    assert format_fleet({"tiers": [t.model_dump() for t in watch.tiers(1.0)], "queued": 7}) == (
        "  fleet: screen 3/6 slots busy (2 launchers); validate 1/1 slots busy (1 launcher); "
        "queued 7"
    )


def test_a_silent_launcher_stops_counting_within_ack_wait() -> None:
    watch = FleetWatch(expiry_s=fleet_expiry(4.0))
    watch.update(status("a", "default", 2, 0, 0), now=0.0)
    watch.update(status("b", "default", 2, 0, 0), now=0.0)
    watch.update(status("a", "default", 2, 0, 0), now=3.5)  # a beats on, b went silent
    assert watch.slots(3.9) == {"default": 4}
    assert watch.slots(4.1) == {"default": 2}


def test_the_expiry_follows_ack_wait_between_three_beats_and_ten_seconds() -> None:
    assert fleet_expiry(4.0) == 4.0
    assert fleet_expiry(30.0) == 10.0  # the default ack_wait_s: as before
    assert fleet_expiry(0.5) == 3.0  # never shorter than three missed beats
