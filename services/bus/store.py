"""Object stores (sources, logs) and the campaigns KV, each declared once, its handle cached.

Resolving a bucket (`js.object_store(name)`) costs a `stream_info` round trip; a store
keeps the handle it declared and reuses it for every get and put. Large bytes never travel
in events: sources are keyed by digest, logs by run id, and events carry the key.

nats-py's `ObjectStore.get` creates (and deletes) an ordered consumer for every object,
about 8 ms per call here; a source or a short log is one chunk, so `get` reads it with two
direct message gets (the object's meta, then its single chunk) and falls back to the store
read for anything else (several chunks, a link).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from services import contracts
from services.bus.errors import BROKER_AWAY, while_broker_away
from services.contracts import CampaignStarted, ContractError

H = TypeVar("H", ObjectStore, KeyValue)

SMALL_OBJECT = 128 * 1024  # nats-py's chunk size: an object this small is one chunk

# A lease call gives up (TransientError) this soon: an unrenewed lease lapses anyway.
LEASE_CALL_S = 1.0


@dataclass(frozen=True)
class LeaseEntry:
    """A campaign's lease as the KV holds it: the holder's name and the entry's revision
    (every renewal is a new revision)."""

    holder: str
    revision: int


class Declared(Generic[H]):
    """A bucket's handle, declared on first use (opened, or created when it does not
    exist yet) and kept; a subclass says how to open and how to create it. A new bucket is
    kept on `replicas` nodes of a NATS cluster."""

    def __init__(self, js: JetStreamContext, name: str, replicas: int = 1) -> None:
        self.js = js
        self.name = name
        self.replicas = replicas
        self._handle: H | None = None

    async def declare(self) -> H:
        if self._handle is None:
            try:
                self._handle = await self._open()
            except nats.js.errors.BucketNotFoundError:
                self._handle = await self._create()
        return self._handle

    async def _open(self) -> H:
        raise NotImplementedError

    async def _create(self) -> H:
        raise NotImplementedError


def bucket_name(prefix: str, name: str) -> str:
    return name if prefix == "ns" else f"{prefix}_{name}"


class ObjectBucket(Declared[ObjectStore]):
    """One object store bucket, declared on first use and its handle kept."""

    async def _open(self) -> ObjectStore:
        return await self.js.object_store(self.name)

    async def _create(self) -> ObjectStore:
        config = api.ObjectStoreConfig(
            bucket=self.name, storage=api.StorageType.FILE, replicas=self.replicas
        )
        return await self.js.create_object_store(self.name, config)

    async def put(self, key: str, data: bytes) -> None:
        async def put() -> None:
            store = await self.declare()
            if len(data) <= SMALL_OBJECT:
                await self._put_small(key, data)
            else:
                await store.put(key, data)

        await while_broker_away(put, what=f"put {self.name}/{key}")

    async def _put_small(self, key: str, data: bytes) -> None:
        """A one-chunk object as nats-py's put stores it (chunk, then meta rolling up the old
        one, then the old chunk purged), with the old meta read while the chunk is stored:
        two round trips instead of three, and no 128 KiB buffer per put."""
        stream = f"OBJ_{self.name}"
        meta_subject = f"$O.{self.name}.M.{base64.urlsafe_b64encode(key.encode()).decode()}"
        nuid = uuid.uuid4().hex
        chunk_subject = f"$O.{self.name}.C.{nuid}"
        info = api.ObjectInfo(
            name=key,
            bucket=self.name,
            nuid=nuid,
            size=len(data),
            chunks=1 if data else 0,
            mtime=datetime.now(UTC).isoformat(),
            digest="SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode(),
            options=api.ObjectMetaOptions(max_chunk_size=SMALL_OBJECT),
        )
        old_meta, _ = await asyncio.gather(
            self._last_meta(stream, meta_subject),
            self.js.publish(chunk_subject, data) if data else asyncio.sleep(0),
        )
        try:
            await self.js.publish(
                meta_subject,
                json.dumps(info.as_dict()).encode(),
                headers={api.Header.ROLLUP: "sub"},
            )
        except BaseException:
            with contextlib.suppress(*BROKER_AWAY, nats.js.errors.Error):
                await self.js.purge_stream(stream, subject=chunk_subject)
            raise
        old = old_meta or {}
        old_nuid = str(old.get("nuid") or "")
        if old_nuid and old_nuid != nuid and not old.get("deleted"):
            await self.js.purge_stream(stream, subject=f"$O.{self.name}.C.{old_nuid}")

    async def _last_meta(self, stream: str, meta_subject: str) -> dict[str, object] | None:
        try:
            msg = await self.js.get_last_msg(stream, meta_subject)
        except nats.js.errors.NotFoundError:
            return None
        meta = json.loads(msg.data or b"{}")
        return meta if isinstance(meta, dict) else None

    async def get(self, key: str) -> bytes:
        """Bytes of an object; KeyError if it does not exist."""
        try:
            small = await self._read_small(key)
        except BROKER_AWAY:
            small = None  # the store read below retries while the broker is away
        if small is not None:
            return small

        async def get() -> bytes:
            store = await self.declare()
            try:
                result = await store.get(key)
            except nats.js.errors.ObjectNotFoundError as exc:
                raise KeyError(f"{self.name}/{key}") from exc
            return bytes(result.data or b"")

        return await while_broker_away(get, what=f"get {self.name}/{key}")

    async def _read_small(self, key: str) -> bytes | None:
        """The object's bytes when it is a plain one-chunk object; None to take the slow path."""
        stream = f"OBJ_{self.name}"
        meta_subject = f"$O.{self.name}.M.{base64.urlsafe_b64encode(key.encode()).decode()}"
        try:
            meta_msg = await self.js.get_last_msg(stream, meta_subject)
        except nats.js.errors.NotFoundError as exc:
            raise KeyError(f"{self.name}/{key}") from exc
        meta = json.loads(meta_msg.data or b"{}")
        if meta.get("deleted"):
            raise KeyError(f"{self.name}/{key}")
        if (meta.get("options") or {}).get("link") or int(meta.get("chunks") or 0) > 1:
            return None
        if int(meta.get("size") or 0) == 0:
            return b""
        chunk = await self.js.get_last_msg(stream, f"$O.{self.name}.C.{meta['nuid']}")
        data = bytes(chunk.data or b"")
        digest = str(meta.get("digest") or "")
        if len(data) != int(meta["size"]) or (
            digest.upper().startswith("SHA-256=")
            and (base64.urlsafe_b64decode(digest[8:]) != hashlib.sha256(data).digest())
        ):
            return None
        return data


_KV_KEY = re.compile(r"[-_=a-zA-Z0-9]+")


CANCELLED = "cancelled: "  # the value of a `finished.` key the ledger wrote


def _finished_key(campaign: str, run_id: str) -> str:
    """`finished.<campaign>.<run id>` (a run id with characters a key may not hold: hashed)."""
    if not _KV_KEY.fullmatch(run_id):
        run_id = "h-" + hashlib.sha256(run_id.encode()).hexdigest()[:40]
    return f"finished.{campaign}.{run_id}"


class CampaignRegistry(Declared[KeyValue]):
    """The campaigns KV: each campaign's CampaignStarted, whether it was stopped, and which
    of its runs finished.

    Keys: `campaign.<name>` holds the encoded CampaignStarted; `stopped.<name>` exists while
    the campaign is stopped (its value is the reason); `finished.<name>.<run id>` once a
    launcher reported the run finished (its value: the RunFinished's id), or once the ledger
    cancelled it (`cancelled: <reason>`: a replicate a decision made useless): either way no
    launcher starts it again; `lease.<name>` names the proposer that tops the campaign up
    (services.proposer.lease: written only by compare-and-set on its revision). Names are
    checked by the CLI to be letters, digits, '-' and '_', so they are valid KV keys.
    """

    async def _open(self) -> KeyValue:
        return await self.js.key_value(self.name)

    async def _create(self) -> KeyValue:
        config = api.KeyValueConfig(
            bucket=self.name, storage=api.StorageType.FILE, replicas=self.replicas
        )
        return await self.js.create_key_value(config)

    async def save(self, event: CampaignStarted) -> None:
        await self._put(f"campaign.{event.campaign}", contracts.encode(event))

    async def load(self, name: str) -> CampaignStarted | None:
        raw = await self._get(f"campaign.{name}")
        if raw is None:
            return None
        try:
            event = contracts.decode(raw)
        except ContractError:
            return None
        return event if isinstance(event, CampaignStarted) else None

    async def mark_finished(self, name: str, run_id: str, event_id: str) -> None:
        """Record that run `run_id` of campaign `name` finished and was reported."""
        await self._put(_finished_key(name, run_id), event_id.encode())

    async def mark_cancelled(self, name: str, run_id: str, reason: str) -> None:
        """Record that run `run_id` of campaign `name` must not start: the ledger cancelled it."""
        await self._put(_finished_key(name, run_id), f"{CANCELLED}{reason}".encode())

    async def settled(self, name: str, run_id: str) -> str | None:
        """Why this run is never to be run (again), whatever the id of the message that asks
        for it: "finished" once a launcher reported it, "cancelled: <reason>" once the ledger
        cancelled it; None while it is still to run."""
        value = await self._get(_finished_key(name, run_id))
        if value is None:
            return None
        text = value.decode(errors="replace")
        return text if text.startswith(CANCELLED) else "finished"

    async def mark_stopped(self, name: str, reason: str) -> None:
        await self._put(f"stopped.{name}", reason.encode())

    async def is_stopped(self, name: str) -> bool:
        return await self._get(f"stopped.{name}") is not None

    async def clear_stopped(self, name: str) -> None:
        async def delete() -> None:
            kv = await self.declare()
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                await kv.delete(f"stopped.{name}")

        await while_broker_away(delete, what=f"kv delete stopped.{name}")

    # --- leases (services.proposer.lease): one proposer tops a campaign up ---------------

    async def read_lease(self, name: str) -> LeaseEntry | None:
        """Who holds `lease.<name>` and at which revision; None when nobody does."""

        async def get() -> LeaseEntry | None:
            kv = await self.declare()
            try:
                entry = await kv.get(f"lease.{name}")
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return None
            return LeaseEntry((entry.value or b"").decode(), int(entry.revision or 0))

        return await while_broker_away(get, what=f"kv get lease.{name}", timeout_s=LEASE_CALL_S)

    async def write_lease(self, name: str, holder: str, revision: int) -> int | None:
        """Compare-and-set: write `holder` to `lease.<name>` if its revision is still
        `revision` (0: if nobody holds it); the new revision, or None when another write
        came first."""

        async def cas() -> int | None:
            kv = await self.declare()
            try:
                if revision == 0:
                    return int(await kv.create(f"lease.{name}", holder.encode()))
                return int(await kv.update(f"lease.{name}", holder.encode(), last=revision))
            except nats.js.errors.KeyWrongLastSequenceError:
                return None

        return await while_broker_away(cas, what=f"kv cas lease.{name}", timeout_s=LEASE_CALL_S)

    async def release_lease(self, name: str, revision: int) -> None:
        """Delete `lease.<name>` if it is still at `revision` (ours); quiet otherwise."""

        async def delete() -> None:
            kv = await self.declare()
            with contextlib.suppress(
                nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError
            ):
                await kv.delete(f"lease.{name}", last=revision)

        await while_broker_away(delete, what=f"kv delete lease.{name}", timeout_s=LEASE_CALL_S)

    async def _put(self, key: str, value: bytes) -> None:
        async def put() -> None:
            kv = await self.declare()
            await kv.put(key, value)

        await while_broker_away(put, what=f"kv put {key}")

    async def _get(self, key: str) -> bytes | None:
        async def get() -> bytes | None:
            kv = await self.declare()
            try:
                entry = await kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return None
            return entry.value

        return await while_broker_away(get, what=f"kv get {key}")
