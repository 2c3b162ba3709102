"""The fleet as the proposer (and the ledger's overview) sees it: the slots per tier of the
launchers heard from lately, summed from their FleetStatus beats."""

from __future__ import annotations

from services.contracts import FleetStatus

FLEET_EXPIRY_S = 10.0
FLEET_MIN_EXPIRY_S = 3.0  # launchers beat every second: three beats missed


def fleet_expiry(ack_wait_s: float) -> float:
    """How long a quiet launcher's slots still count: no longer than `ack_wait_s` (by then
    its runs are delivered to the others), nor than FLEET_EXPIRY_S, and at least three of
    its beats."""
    return max(FLEET_MIN_EXPIRY_S, min(FLEET_EXPIRY_S, ack_wait_s))


class Fleet:
    """Slots per tier, summed over the launchers heard from in the last FLEET_EXPIRY_S."""

    def __init__(self, expiry_s: float = FLEET_EXPIRY_S) -> None:
        self.expiry_s = expiry_s
        self._launchers: dict[str, tuple[float, FleetStatus]] = {}

    def update(self, status: FleetStatus, now: float) -> bool:
        """Record a launcher's status; True when its slots changed (or it is new)."""
        previous = self._launchers.get(status.launcher_id)
        self._launchers[status.launcher_id] = (now, status)
        return previous is None or previous[1].slots != status.slots

    def _live(self, now: float) -> list[FleetStatus]:
        for lid, (seen, _) in list(self._launchers.items()):
            if now - seen > self.expiry_s:
                del self._launchers[lid]
        return [status for _, status in self._launchers.values()]

    def slots(self, now: float) -> dict[str, int]:
        total: dict[str, int] = {}
        for status in self._live(now):
            for tier, n in status.slots.items():
                total[tier] = total.get(tier, 0) + n
        return total

    def free(self, now: float) -> dict[str, int]:
        total: dict[str, int] = {}
        for status in self._live(now):
            for tier, n in status.slots.items():
                total[tier] = total.get(tier, 0) + max(0, n - status.busy.get(tier, 0))
        return total
