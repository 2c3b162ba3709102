"""The campaign's harness (the trainer directory minus the edited file) on local disk.

The CLI puts a tar.gz of it in the `sources` bucket under `harness_key`; a launcher
extracts it once per key into `<runs_path>/harness/<key>/`, atomically (extract beside,
then rename), so concurrent slots and launcher processes never see half a harness.

Each run gets a fresh copy of it (local.py), and before each run every file of the
archive is checked against its hash, kept in this process's memory: a harness changed on
disk (a run outside the sandbox can write it) is set aside and extracted anew, so no run
executes a `prepare.py` or helper that an earlier run rewrote. A file whose stamp (inode,
size, modification and change times) is the one it had when it was last hashed is not
hashed again: a write, a rename over it or a `touch` changes its change time, which no
process can set back. That check is a few `stat` calls, made without a lock or a thread:
hashing every run's harness in turn, behind one lock, held a thousand runs that end
together for up to 0.7 s each.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.contracts import harness_root
from services.telemetry import get_logger


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


def archive_digests(data: bytes) -> dict[str, str]:
    """sha256 of each regular file of a harness archive, by its path in the archive."""
    out: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar.getmembers():
            fh = tar.extractfile(member) if member.isfile() else None
            if fh is not None:
                out[member.name] = hashlib.sha256(fh.read()).hexdigest()
    return out


def changed_files(dest: Path, digests: dict[str, str]) -> list[str]:
    """The archive's files that are missing or different under `dest`."""
    changed = []
    for name, digest in digests.items():
        try:
            actual = hashlib.sha256((dest / name).read_bytes()).hexdigest()
        except OSError:
            actual = ""
        if actual != digest:
            changed.append(name)
    return changed


Stamp = tuple[int, int, int, int]


def file_stamps(dest: Path, names: list[str]) -> dict[str, Stamp] | None:
    """Each file's (inode, size, mtime, ctime); None if one is missing."""
    out: dict[str, Stamp] = {}
    for name in names:
        try:
            st = (dest / name).stat()
        except OSError:
            return None
        out[name] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


def set_aside(dest: Path) -> None:
    """Move a changed harness out of the way (atomically), then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.changed.", dir=dest.parent))
    try:
        os.rename(dest, trash / dest.name)
    except FileNotFoundError:
        pass  # another launcher process set it aside first
    except OSError as exc:
        raise HarnessError(f"cannot set aside the changed harness {dest}: {exc}") from exc
    finally:
        shutil.rmtree(trash, ignore_errors=True)


class HarnessCache:
    """Harness directories by key, each checked against its archive before it is used."""

    def __init__(self, root: Path, fetch: Callable[[str], Awaitable[bytes]]) -> None:
        self.root = Path(root)
        self.fetch = fetch
        self._locks: dict[str, asyncio.Lock] = {}
        self._digests: dict[str, dict[str, str]] = {}
        # key -> (its root, its files' stamps when they last matched their hashes)
        self._verified: dict[str, tuple[Path, dict[str, Stamp]]] = {}

    async def get(self, key: str) -> Path:
        dest = self.root / safe_name(key)
        verified = self._verified.get(key)
        if verified is not None and file_stamps(dest, list(verified[1])) == verified[1]:
            return verified[0]  # unchanged since its files were last hashed
        async with self._locks.setdefault(key, asyncio.Lock()):
            data = b""
            if key not in self._digests:
                data = await self._fetch(key)
                self._digests[key] = await asyncio.to_thread(archive_digests, data)
            digests = self._digests[key]
            if dest.is_dir():
                # Stamped before hashing: a change after the stamp shows at the next run.
                stamps = file_stamps(dest, list(digests))
                changed = await asyncio.to_thread(changed_files, dest, digests)
                if not changed:
                    root = harness_root(dest)
                    if stamps is not None:
                        self._verified[key] = (root, stamps)
                    return root
                get_logger(component="launcher.harness").warning(
                    "harness_changed_on_disk", harness=str(dest), files=changed[:20]
                )
                await asyncio.to_thread(set_aside, dest)
            # Extracted anew; its stamps are taken (and its files hashed) at the next run.
            self._verified.pop(key, None)
            return await asyncio.to_thread(extract_harness, data or await self._fetch(key), dest)

    async def _fetch(self, key: str) -> bytes:
        try:
            return await self.fetch(key)
        except KeyError as exc:
            raise HarnessError(f"harness {key!r} is not in the sources bucket") from exc
