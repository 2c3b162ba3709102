"""NATS JetStream for the services, one concern per module; nothing else in nightshift
touches nats-py's JetStream API.

- connection: `Bus.from_settings(settings, name)`, the stream, consumer lag and reset;
- publish: an event to the stream (deduplicated by id) or over core NATS (lossy);
- consume: durable pull consumers declared as `{EventType: handler}` (`handlers_of`
  builds one from the handlers' signatures), ack / nak / term / dead letter, heartbeats
  while a handler runs;
- follow: replay-then-follow of the history, for services that rebuild state in memory;
- store: object stores (sources, logs) and the campaigns KV, handles cached;
- errors: TransientError, PoisonError and the retry policy while the broker is away.
"""

from services.bus.connection import AuthenticationError, Bus, ConsumerLag, Credentials
from services.bus.consume import Delivery, Handler, Handlers, handlers_of, handlers_on
from services.bus.errors import BROKER_AWAY, PoisonError, TransientError
from services.bus.follow import FollowMark
from services.bus.publish import gather_limited
from services.bus.store import CampaignRegistry, LeaseEntry, ObjectBucket

__all__ = [
    "BROKER_AWAY",
    "AuthenticationError",
    "Bus",
    "CampaignRegistry",
    "ConsumerLag",
    "Credentials",
    "Delivery",
    "FollowMark",
    "Handler",
    "Handlers",
    "LeaseEntry",
    "ObjectBucket",
    "PoisonError",
    "TransientError",
    "gather_limited",
    "handlers_of",
    "handlers_on",
]
