"""Which proposer tops a campaign up: a lease per campaign in the campaigns KV.

Several proposer processes may run on the same campaigns; each follows the whole history,
so each knows every variant proposed and every result, but only the holder of a
campaign's lease proposes for it (and completes or halts it). The others stand by and
take the campaign over when its holder stops renewing.

Why a lease and not a work-queue consumer. The proposer's work is not a message: it is
the gap between the fleet's slots + look-ahead and what is in flight, recomputed from the
whole history after every result. A work queue of "propose for campaign c" tickets would
still need one consumer to own the gap (two holding tickets of one campaign at once
would both fill it), would redeliver a ticket only after `ack_wait`, and would keep one
ticket per campaign alive by republishing it forever. A lease is that ownership stated
directly: a KV key `lease.<campaign>` whose value names the holder, written only by
compare-and-set on its revision (create when absent, update with the revision last read),
renewed every `lease_renew_s`, lapsing after `lease_ttl_s` without a renewal.

Lapse without clocks. Nobody compares wall clocks (machines' clocks drift): a standby that
reads the same revision for `lease_ttl_s` of its own monotonic time takes the lease with a
compare-and-set on that revision; the holder counts its lease valid only until `lease_ttl_s`
after it *sent* its last successful write, so it stops proposing before any standby can
have taken over. A holder that loses the broker for longer simply lapses; a holder that
stops (SIGTERM) deletes its lease (compare-and-set again) and a standby takes it at its next
renewal tick.

The half-published wave. A holder killed mid-wave published some of its variants. The new
holder does not propose until its follow of the stream has read everything stored before
it took the lease (bus.FollowMark), so every variant the old holder got into the stream is
in its history: counted in flight, and rejected as known if the strategy proposes it again.
A variant whose publish was still in flight at the kill lands within the JetStream
duplicate window at worst, and its id (`proposed:<campaign>:<variant>`, a hash of the
source) makes a second publish of the same variant a duplicate the stream drops.

What is not excluded: a holder cut off from the broker while one publish is under way
retries that publish (up to 120 s, the duplicate window) and checks its lease only before
the next one; if a standby took over meanwhile, that one late variant may exceed the
in-flight target by one. It is a real variant, in the history, run and evaluated once.

This module is the lease logic (LeaseBook: pure, no I/O) and the keeper that applies it to
the KV through the bus (LeaseKeeper).
"""

from __future__ import annotations

import asyncio
import enum
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from services.bus import Bus, LeaseEntry, TransientError
from services.bus.errors import NATS_FAILURES
from services.telemetry import get_logger

log = get_logger(service="proposer")

# What a lease call can meet while the broker is away (the lease then lapses by itself).
LEASE_FAILURES: tuple[type[Exception], ...] = (TransientError, *NATS_FAILURES)


class LeaseLost(Exception):
    """This proposer no longer holds the campaign's lease: its wave stops here."""


class Step(enum.Enum):
    CREATE = "create"  # nobody holds it: create the key
    RENEW = "renew"  # ours: write it again on our revision
    TAKE = "take"  # another's, unrenewed for a whole TTL: overwrite that revision
    WAIT = "wait"  # another's, still renewed (or not watched long enough yet)


@dataclass
class Claim:
    """One campaign's lease as this proposer sees it."""

    revision: int = 0  # our latest write while we hold it (0: not ours)
    valid_until: float = 0.0  # monotonic: ours until then, unless renewed
    acquired_at: float = 0.0  # monotonic: when we took it (the history must be read past it)
    seen: int = 0  # another holder's revision, as last read
    seen_since: float = 0.0  # when that revision was first read


class LeaseBook:
    """The lease logic, pure: what to do on reading a lease, what a write means."""

    def __init__(self, holder: str, ttl_s: float) -> None:
        self.holder = holder
        self.ttl_s = ttl_s
        self.claims: dict[str, Claim] = {}

    def plan(self, name: str, entry: LeaseEntry | None, now: float) -> tuple[Step, int]:
        """What to do about `name`'s lease, read as `entry` at `now`: a step and the
        revision its compare-and-set expects (0: the key must be absent)."""
        claim = self.claims.setdefault(name, Claim())
        if entry is None:
            claim.revision, claim.seen = 0, 0
            return Step.CREATE, 0
        if claim.revision and entry.revision == claim.revision and entry.holder == self.holder:
            return Step.RENEW, entry.revision
        claim.revision = 0  # another's (or rewritten since we held it): not ours any more
        if entry.revision != claim.seen:
            claim.seen, claim.seen_since = entry.revision, now
            return Step.WAIT, entry.revision
        if now - claim.seen_since >= self.ttl_s:
            return Step.TAKE, entry.revision
        return Step.WAIT, entry.revision

    def wrote(self, name: str, step: Step, revision: int | None, sent_at: float) -> bool:
        """Record the outcome of a CREATE, RENEW or TAKE sent at `sent_at` (revision None:
        another write came first). True when this write acquired the lease."""
        claim = self.claims.setdefault(name, Claim())
        if revision is None:
            claim.revision, claim.valid_until = 0, 0.0
            return False
        acquired = step is not Step.RENEW
        claim.revision, claim.valid_until, claim.seen = revision, sent_at + self.ttl_s, 0
        if acquired:
            claim.acquired_at = time.monotonic()
        return acquired

    def holds(self, name: str, now: float) -> bool:
        claim = self.claims.get(name)
        return claim is not None and claim.revision > 0 and now < claim.valid_until

    def held(self) -> list[tuple[str, int]]:
        """(campaign, revision) of every lease written as ours (valid or not)."""
        return [(name, c.revision) for name, c in self.claims.items() if c.revision]

    def forget(self, name: str) -> None:
        self.claims.pop(name, None)


def holder_name() -> str:
    """This process among the proposers: host, pid and a random part (a pid is reused)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class LeaseKeeper:
    """Keeps the leases of the running campaigns: renews ours, takes lapsed ones, releases
    the leases of campaigns no longer running. `holds()` is what the proposer asks before
    every wave and every publish."""

    def __init__(self, bus: Bus, ttl_s: float, renew_s: float, holder: str = "") -> None:
        self.bus = bus
        self.book = LeaseBook(holder or holder_name(), ttl_s)
        self.renew_s = min(renew_s, ttl_s / 3)
        self.due = asyncio.Event()  # set to step now (a campaign appeared)
        self.log = log.bind(holder=self.book.holder)

    def holds(self, name: str) -> bool:
        return self.book.holds(name, time.monotonic())

    def acquired_at(self, name: str) -> float:
        claim = self.book.claims.get(name)
        return claim.acquired_at if claim is not None else float("inf")

    def knows(self, name: str) -> bool:
        return name in self.book.claims

    async def keep(
        self,
        running: Callable[[], Iterable[str]],
        stop: asyncio.Event,
        on_acquired: Callable[[], None],
    ) -> None:
        """Step every `renew_s` (or when `due`) until `stop`; then release what we hold."""
        try:
            while not stop.is_set():
                self.due.clear()
                if any([await self.step(name) for name in list(running())]):
                    on_acquired()
                await self.release_others(set(running()))
                waits = [asyncio.ensure_future(e.wait()) for e in (stop, self.due)]
                await asyncio.wait(waits, timeout=self.renew_s, return_when="FIRST_COMPLETED")
                for w in waits:
                    w.cancel()
        finally:
            await self.release_others(set())

    async def step(self, name: str) -> bool:
        """Read, then create / renew / take `name`'s lease; True when it became ours."""
        try:
            entry = await self.bus.campaigns.read_lease(name)
            step, revision = self.book.plan(name, entry, time.monotonic())
            if step is Step.WAIT:
                return False
            sent_at = time.monotonic()
            written = await self.bus.campaigns.write_lease(name, self.book.holder, revision)
        except LEASE_FAILURES as exc:
            self.log.warning("lease_step_failed", campaign=name, error=repr(exc))
            return False
        acquired = self.book.wrote(name, step, written, sent_at)
        if acquired:
            self.log.info("lease_acquired", campaign=name, how=step.value, revision=written)
        elif written is None and step is Step.RENEW:
            self.log.warning("lease_lost", campaign=name)
        return acquired

    async def release_others(self, keep: set[str]) -> None:
        """Release our leases of campaigns not in `keep` (stopped, or we are stopping)."""
        held = dict(self.book.held())
        for name in [n for n in self.book.claims if n not in keep]:
            self.book.forget(name)
            revision = held.get(name, 0)
            if not revision:
                continue
            try:
                await self.bus.campaigns.release_lease(name, revision)
            except LEASE_FAILURES as exc:
                self.log.warning("lease_release_failed", campaign=name, error=repr(exc))
                continue
            self.log.info("lease_released", campaign=name)
