"""A run's output on its way to `run.log`: capped, throttled, and with known secrets redacted.

- The stored log keeps at most `max_bytes`: its first half as written, its last half held in
  memory (a bounded buffer) and written at the end after a marker line that says how much
  was cut. A trainer printing 200 MB costs `max_bytes` of disk and about half of it in memory.
- At most `rate_bytes_s` bytes a second are read from the run (a token bucket with one
  second of burst); a faster trainer blocks on its own full pipe.
- Every known secret value (the API key, NATS password and token) is replaced by
  `[redacted]` in the finished log, from which the log tail and stored log are read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from services.contracts import output_cut_line, split_lines
from services.launcher.backend import LineCallback
from services.telemetry import get_logger

REDACTED = b"[redacted]"
READ_CHUNK = 65536
MIN_SECRET_CHARS = 4  # shorter "secrets" would redact half the log


@dataclass(frozen=True)
class OutputLimits:
    max_bytes: int = 4 * 1024 * 1024
    rate_bytes_s: int = 1024 * 1024
    secrets: Sequence[str] = ()


@dataclass
class CappedLog:
    """Writes the head of the output to `sink`, keeps the tail in memory until `close()`."""

    sink: BinaryIO
    max_bytes: int
    written: int = 0
    cut: int = 0
    tail: bytearray = field(default_factory=bytearray)

    def write(self, chunk: bytes) -> None:
        head_room = max(0, self.max_bytes // 2 - self.written)
        if head_room:
            head = chunk[:head_room]
            self.sink.write(head)
            self.sink.flush()
            self.written += len(head)
            chunk = chunk[head_room:]
        if not chunk:
            return
        self.tail += chunk
        keep = self.max_bytes - self.max_bytes // 2
        if len(self.tail) > keep:
            self.cut += len(self.tail) - keep
            del self.tail[: len(self.tail) - keep]

    def close(self) -> None:
        if self.cut:
            line = output_cut_line(self.cut, self.max_bytes)
            self.sink.write(f"\n{line}\n".encode())
        self.sink.write(bytes(self.tail))
        self.sink.flush()
        self.tail.clear()


class Throttle:
    """A token bucket: `await take(n)` returns once n more bytes fit in the rate."""

    def __init__(self, rate_bytes_s: int) -> None:
        self.rate = rate_bytes_s
        self.tokens = float(rate_bytes_s)
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self.tokens = min(float(self.rate), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


async def pump(
    stream: asyncio.StreamReader, log: CappedLog, on_line: LineCallback, rate_bytes_s: int
) -> None:
    """Copy the process output into the capped log, calling on_line for each complete line."""
    throttle = Throttle(rate_bytes_s)
    pending = ""
    while True:
        chunk = await stream.read(READ_CHUNK)
        if not chunk:
            break
        log.write(chunk)
        pending += chunk.decode(errors="replace")
        *lines, pending = split_lines(pending)
        pending = pending[-READ_CHUNK:]  # output with no line ends at all stays bounded
        for line in lines:
            if line.strip():
                _call(on_line, line)
        await throttle.take(len(chunk))
    if pending.strip():
        _call(on_line, pending)


def _call(on_line: LineCallback, line: str) -> None:
    try:
        on_line(line)
    except Exception as exc:  # last resort: a broken observer must not break the run
        get_logger(component="launcher.local").warning("on_line_failed", error=repr(exc))


def usable_secrets(secrets: Iterable[str]) -> list[bytes]:
    """The secret values worth redacting, longest first (a secret inside another one)."""
    values = {s.strip().encode() for s in secrets if len(s.strip()) >= MIN_SECRET_CHARS}
    return sorted(values, key=len, reverse=True)


def redact(data: bytes, secrets: Sequence[bytes]) -> bytes:
    for secret in secrets:
        data = data.replace(secret, REDACTED)
    return data


def redact_file(path: Path, secrets: Sequence[str]) -> None:
    """Rewrite the (capped) log at `path` with every secret value replaced."""
    values = usable_secrets(secrets)
    if not values or not path.is_file():
        return
    data = path.read_bytes()
    clean = redact(data, values)
    if clean != data:
        path.write_bytes(clean)


def redact_text(text: str, secrets: Sequence[str]) -> str:
    return redact(text.encode(), usable_secrets(secrets)).decode(errors="replace")
