"""The campaign's harness (the trainer directory minus the edited file) on local disk.

The CLI puts a tar.gz of it in the `sources` bucket under `harness_key`; a launcher
extracts it once per key into `<runs_path>/harness/<key>/`, atomically (extract beside,
then rename), so concurrent slots and launcher processes never see half a harness.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.contracts import harness_root


class HarnessError(Exception):
    """The harness archive is missing or unusable."""


def safe_name(key: str) -> str:
    return re.sub(r"[^\w.-]", "_", key)[:200] or "_"


def extract_harness(data: bytes, dest: Path) -> Path:
    """Extract a tar(.gz) into `dest` once; return the harness root inside it."""
    if dest.is_dir():
        return harness_root(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            tar.extractall(tmp, filter="data")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # not another process winning the race
                raise
    except (tarfile.TarError, OSError) as exc:
        raise HarnessError(f"cannot extract the harness into {dest}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return harness_root(dest)


class HarnessCache:
    """Harness directories by key, fetched and extracted at most once per process."""

    def __init__(self, root: Path, fetch: Callable[[str], Awaitable[bytes]]) -> None:
        self.root = Path(root)
        self.fetch = fetch
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, key: str) -> Path:
        dest = self.root / safe_name(key)
        if dest.is_dir():
            return harness_root(dest)
        async with self._locks.setdefault(key, asyncio.Lock()):
            if dest.is_dir():
                return harness_root(dest)
            try:
                data = await self.fetch(key)
            except KeyError as exc:
                raise HarnessError(f"harness {key!r} is not in the sources bucket") from exc
            return await asyncio.to_thread(extract_harness, data, dest)
