"""`nightshift status | best | results`: read the ledger over HTTP, or from disk.

Two readers answer the same questions (`LedgerReader`): `HttpLedgerReader` asks a running
ledger's API, `FileLedgerReader` reads the SQLite file under `.nightshift/` directly, which
also works after the system stopped. `reader_for` picks one: with `--url` (or
`NIGHTSHIFT_LEDGER_URL`) the HTTP one, otherwise the file. Both raise LookupError for an
unknown campaign or a campaign without a best (the HTTP one with the API's detail), and
the HTTP one ConnectionError for a ledger it cannot reach or that fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx

from services.ledger import queries, tsv
from services.ledger.db import open_read
from services.settings import Settings

T = TypeVar("T")

HTTP_TIMEOUT_S = 10.0


class LedgerUnavailable(LookupError):
    """Neither a ledger URL nor a ledger file to read."""


def unknown_campaign(name: str) -> LookupError:
    return LookupError(f"unknown campaign {name!r}")


def no_best(name: str) -> LookupError:
    return LookupError(f"campaign {name!r} has no best variant yet")


class LedgerReader(Protocol):
    """What the CLI asks a ledger."""

    def campaigns(self) -> list[dict[str, Any]]:
        """Every campaign, oldest first."""
        ...

    def summary(self, name: str) -> dict[str, Any]:
        """The campaign with its counts, best and LLM cost."""
        ...

    def best_source(self, name: str) -> str:
        """The source of the campaign's best variant."""
        ...

    def results_tsv(self, name: str) -> str:
        """The campaign's results in autoresearch's results.tsv format."""
        ...

    def dead_letters(self) -> list[dict[str, Any]]:
        """Every dead letter, newest first (those of no readable campaign too)."""
        ...

    def fleet(self, name: str) -> dict[str, Any] | None:
        """The fleet as the running ledger hears it (None: a file has no fleet, or no
        launcher was heard)."""
        ...


class HttpLedgerReader:
    """A running ledger's HTTP API."""

    def __init__(self, url: str, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _get(self, path: str) -> httpx.Response:
        try:
            response = httpx.get(f"{self.url}{path}", timeout=self.timeout_s)
        except httpx.TransportError as exc:
            raise ConnectionError(f"cannot reach the ledger at {self.url}: {exc!r}") from exc
        if response.status_code == 404:
            raise LookupError(_detail(response) or f"not found: {path}")
        if response.is_error:
            raise ConnectionError(
                f"the ledger at {self.url} answered {response.status_code} to {path}: "
                f"{_detail(response)}"
            )
        return response

    def campaigns(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._get("/campaigns").json()
        return data

    def summary(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = self._get(f"/campaigns/{name}").json()
        return data

    def best_source(self, name: str) -> str:
        return self._get(f"/campaigns/{name}/best/train.py").text

    def results_tsv(self, name: str) -> str:
        return self._get(f"/campaigns/{name}/results.tsv").text

    def dead_letters(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._get("/deadletters").json()
        return data

    def fleet(self, name: str) -> dict[str, Any] | None:
        data: dict[str, Any] = self._get(f"/campaigns/{name}/overview").json()
        fleet: dict[str, Any] = data.get("fleet") or {}
        return fleet if fleet.get("heard") else None  # no launcher heard: as from a file


def _detail(response: httpx.Response) -> str:
    """The API's `detail` of an error, or the body when it is not the API's JSON."""
    try:
        body = response.json()
    except ValueError:  # not JSON: a proxy's page, say
        return response.text[:200]
    return str(body.get("detail", "")) if isinstance(body, dict) else str(body)[:200]


class FileLedgerReader:
    """The ledger's SQLite file, read-only (also while the service writes it)."""

    def __init__(self, db_path: Path) -> None:
        if not db_path.exists():
            raise LedgerUnavailable(
                f"no ledger at {db_path}; run `nightshift up` first, or pass --url "
                "with the ledger's HTTP address"
            )
        self.db_path = db_path

    def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        with contextlib.closing(open_read(self.db_path)) as conn:
            return query(conn)

    def campaigns(self) -> list[dict[str, Any]]:
        return self._read(queries.list_campaigns)

    def summary(self, name: str) -> dict[str, Any]:
        found = self._read(lambda conn: queries.campaign_summary(conn, name))
        if found is None:
            raise unknown_campaign(name)
        return found

    def best_source(self, name: str) -> str:
        found = self._read(lambda conn: queries.best(conn, name))
        if found is None or not found.get("source"):
            raise no_best(name)
        return str(found["source"])

    def results_tsv(self, name: str) -> str:
        found = self._read(lambda conn: tsv.results_tsv(conn, name))
        if found is None:
            raise unknown_campaign(name)
        return found

    def dead_letters(self) -> list[dict[str, Any]]:
        return self._read(queries.all_dead_letters)

    def fleet(self, name: str) -> dict[str, Any] | None:  # noqa: ARG002 (the reader protocol)
        return None  # the fleet is heard over NATS by a running ledger, never stored


def reader_for(settings: Settings, url: str | None) -> LedgerReader:
    """The HTTP reader for `url` (or NIGHTSHIFT_LEDGER_URL), else the file of `settings`."""
    url = url or os.environ.get("NIGHTSHIFT_LEDGER_URL") or ""
    if url:
        return HttpLedgerReader(url)
    return FileLedgerReader(settings.ledger_path)


def _campaign_name(reader: LedgerReader, wanted: str | None) -> str:
    if wanted:
        return wanted
    names = [c["name"] for c in reader.campaigns()]
    if not names:
        raise LookupError("the ledger holds no campaign yet")
    if len(names) > 1:
        print(
            f"several campaigns ({', '.join(names)}); showing {names[-1]}; "
            "pick one with --campaign",
            file=sys.stderr,
        )
    return str(names[-1])


def show(command: str, settings: Settings, args: argparse.Namespace) -> int:
    reader = reader_for(settings, args.url)
    name = _campaign_name(
        reader, args.campaign or (settings.campaign if settings.campaign != "default" else None)
    )
    if command == "best":
        source = reader.best_source(name)
        if args.output:
            Path(args.output).write_text(source)
            print(f"wrote the best {name} source to {args.output}", file=sys.stderr)
        else:
            sys.stdout.write(source)
    elif command == "results":
        sys.stdout.write(reader.results_tsv(name))
    else:
        print(format_status(reader.summary(name)))
        fleet = reader.fleet(name)
        if fleet is not None:
            print(format_fleet(fleet))
        print(format_dead_letters(reader.dead_letters(), name))
    return 0


def format_status(summary: dict[str, Any]) -> str:
    counts = summary.get("counts", {})
    best = summary.get("best") or {}
    llm = summary.get("llm", {})
    lines = [
        f"campaign {summary.get('name')}: {summary.get('status')}",
        f"  proposed {counts.get('proposed', 0)}, running {counts.get('running', 0)}, "
        f"evaluated {counts.get('experiments', 0)} ({counts.get('evaluated', 0)} runs, "
        f"replicates included: {json.dumps(counts.get('results', {}))})",
    ]
    if best:
        lines.append(f"  best {best.get('value')} ({best.get('variant_id')}: {best.get('title')})")
    if llm.get("usd"):
        lines.append(f"  LLM cost ${llm['usd']:.4f}")
    gpu = summary.get("gpu", {})
    if gpu.get("usd"):
        lines.append(
            f"  GPU cost ${gpu['usd']:.2f} ({gpu['gpu_seconds'] / 3600:.2f} GPU-hours; "
            f"${gpu['infra_usd']:.2f} of it lost to infrastructure failures)"
        )
    return "\n".join(lines)


def format_fleet(fleet: dict[str, Any]) -> str:
    """The fleet line: busy / slots per tier, summed over its launchers, and the queue."""
    parts = [
        f"{t['tier']} {t['busy']}/{t['slots']} slots busy "
        f"({t.get('launchers', 0)} launcher{'' if t.get('launchers') == 1 else 's'})"
        for t in fleet.get("tiers") or []
    ]
    return f"  fleet: {'; '.join(parts)}; queued {fleet.get('queued', 0)}"


def format_dead_letters(letters: list[dict[str, Any]], name: str) -> str:
    """The campaign's dead letters (the latest one's error) and those of no readable
    campaign or another one, which no campaign's page shows."""
    mine = [d for d in letters if d.get("campaign") == name]
    others = len(letters) - len(mine)
    lines = [f"  dead letters: {len(mine)} (GET /campaigns/{name}/deadletters)"]
    if mine:
        lines[0] += f"; latest: {str(mine[0].get('error', ''))[:160]}"
    if others:
        unreadable = sum(1 for d in letters if d.get("campaign") == "?")
        lines.append(
            f"  dead letters of other or unreadable campaigns: {others} ({unreadable} "
            "undecodable; GET /deadletters)"
        )
    return "\n".join(lines)
