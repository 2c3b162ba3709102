"""Fetching sources and logs from the object stores, fast.

nats-py's `ObjectStore.get` creates (and deletes) an ordered consumer for every object,
about 8 ms per call here; at a few hundred events/s the ledger would spend its time there.
A source or a short log is one chunk, so read it with two direct message gets (the
object's meta, then its single chunk) and fall back to `Bus.get_object` for anything else
(several chunks, a link, an error): `Bus.get_object`'s store read, which also retries
while the broker is away.
"""

from __future__ import annotations

import base64
import hashlib
import json

import nats.js.errors
from nats.js.client import JetStreamContext


def _meta_subject(bucket: str, key: str) -> str:
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(key.encode()).decode()}"


async def read_small_object(js: JetStreamContext, bucket: str, key: str) -> bytes | None:
    """The object's bytes when it is a plain one-chunk object; None to take the slow path."""
    stream = f"OBJ_{bucket}"
    try:
        meta_msg = await js.get_last_msg(stream, _meta_subject(bucket, key))
    except nats.js.errors.NotFoundError as exc:
        raise KeyError(f"{bucket}/{key}") from exc
    meta = json.loads(meta_msg.data or b"{}")
    if meta.get("deleted"):
        raise KeyError(f"{bucket}/{key}")
    if (meta.get("options") or {}).get("link") or int(meta.get("chunks") or 0) > 1:
        return None
    if int(meta.get("size") or 0) == 0:
        return b""
    chunk = await js.get_last_msg(stream, f"$O.{bucket}.C.{meta['nuid']}")
    data = bytes(chunk.data or b"")
    digest = str(meta.get("digest") or "")
    if len(data) != int(meta["size"]) or (digest.upper().startswith("SHA-256=") and (
        base64.urlsafe_b64decode(digest[8:]) != hashlib.sha256(data).digest()
    )):
        return None
    return data
