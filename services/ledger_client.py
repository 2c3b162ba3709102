"""`nightshift status | best | results`: read the ledger over HTTP, or from disk.

With `--url` (or `NIGHTSHIFT_LEDGER_URL`) the CLI asks a running ledger; otherwise it
reads the SQLite file under `.nightshift/` directly, which also works after the system
stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from services.settings import Settings


class LedgerUnavailable(LookupError):
    """Neither a ledger URL nor a ledger file to read."""


class _Reader:
    """One of two sources with the same questions: a ledger URL or the file on disk."""

    def __init__(self, settings: Settings, url: str | None) -> None:
        self.url = (url or os.environ.get("NIGHTSHIFT_LEDGER_URL") or "").rstrip("/")
        self.db_path = settings.ledger_path
        if not self.url and not self.db_path.exists():
            raise LedgerUnavailable(
                f"no ledger at {self.db_path}; run `nightshift up` first, or pass --url "
                "with the ledger's HTTP address"
            )

    def _get(self, path: str) -> httpx.Response:
        response = httpx.get(f"{self.url}{path}", timeout=10)
        if response.status_code == 404:
            raise LookupError(response.json().get("detail", f"not found: {path}"))
        response.raise_for_status()
        return response

    def _query(self, name: str, *args: Any) -> Any:
        from services.ledger import queries
        from services.ledger.db import open_read

        conn = open_read(self.db_path)
        try:
            return getattr(queries, name)(conn, *args)
        finally:
            conn.close()

    def campaigns(self) -> list[dict[str, Any]]:
        if self.url:
            data: list[dict[str, Any]] = self._get("/campaigns").json()
            return data
        result: list[dict[str, Any]] = self._query("list_campaigns")
        return result

    def summary(self, name: str) -> dict[str, Any]:
        if self.url:
            data: dict[str, Any] = self._get(f"/campaigns/{name}").json()
            return data
        found = self._query("campaign_summary", name)
        if found is None:
            raise LookupError(f"unknown campaign {name!r}")
        return dict(found)

    def best_source(self, name: str) -> str:
        if self.url:
            return self._get(f"/campaigns/{name}/best/train.py").text
        found = self._query("best", name)
        if found is None or not found.get("source"):
            raise LookupError(f"campaign {name!r} has no best variant yet")
        return str(found["source"])

    def results_tsv(self, name: str) -> str:
        if self.url:
            return self._get(f"/campaigns/{name}/results.tsv").text
        found = self._query("results_tsv", name)
        if found is None:
            raise LookupError(f"unknown campaign {name!r}")
        return str(found)


def _campaign_name(reader: _Reader, wanted: str | None) -> str:
    if wanted:
        return wanted
    names = [c["name"] for c in reader.campaigns()]
    if not names:
        raise LookupError("the ledger holds no campaign yet")
    if len(names) > 1:
        print(f"several campaigns ({', '.join(names)}); showing {names[-1]}; "
              "pick one with --campaign", file=sys.stderr)
    return str(names[-1])


def show(command: str, settings: Settings, args: argparse.Namespace) -> int:
    reader = _Reader(settings, args.url)
    name = _campaign_name(reader, args.campaign or (
        settings.campaign if settings.campaign != "default" else None))
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
    return 0


def format_status(summary: dict[str, Any]) -> str:
    counts = summary.get("counts", {})
    best = summary.get("best") or {}
    llm = summary.get("llm", {})
    lines = [
        f"campaign {summary.get('name')}: {summary.get('status')}",
        f"  proposed {counts.get('proposed', 0)}, running {counts.get('running', 0)}, "
        f"evaluated {counts.get('evaluated', 0)} {json.dumps(counts.get('results', {}))}",
    ]
    if best:
        lines.append(f"  best {best.get('value')} ({best.get('variant_id')}: {best.get('title')})")
    if llm.get("usd"):
        lines.append(f"  LLM cost ${llm['usd']:.4f}")
    if counts.get("dead_letters"):
        lines.append(f"  dead letters: {counts['dead_letters']} (GET /campaigns/NAME/deadletters)")
    return "\n".join(lines)
