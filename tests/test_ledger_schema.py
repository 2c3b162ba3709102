"""The ledger's schema on open: a current file as is, an older one moved aside (the service
then rebuilds it from the stream, see test_ledger_service), a newer one refused."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from services.ledger import queries
from services.ledger.db import SCHEMA_VERSION, LedgerError, open_db
from services.ledger.projection import apply_event
from tests.synthetic import synthetic_campaign


def _ledger(path: Path, variants: int = 2) -> int:
    """A current ledger with a synthetic campaign; the number of events applied."""
    with contextlib.closing(open_db(path)) as conn:
        for event, source, log in synthetic_campaign(variants=variants):
            apply_event(conn, event, source_text=source, log_text=log)
        return queries.events_applied(conn)


def _edit(path: Path, *statements: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for statement in statements:
            conn.execute(statement)
        conn.commit()


def _version(conn: sqlite3.Connection) -> str:
    return str(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])


def test_a_current_ledger_opens_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    applied = _ledger(path)
    with contextlib.closing(open_db(path)) as conn:
        assert queries.events_applied(conn) == applied
        assert _version(conn) == str(SCHEMA_VERSION)
    assert list(tmp_path.glob("*.bak")) == []


def test_a_newer_schema_is_refused_naming_both_versions(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    applied = _ledger(path)
    newer = SCHEMA_VERSION + 1
    _edit(path, f"UPDATE meta SET value = '{newer}' WHERE key = 'schema_version'")
    with pytest.raises(LedgerError) as refused:
        open_db(path)
    message = str(refused.value)
    assert f"schema {newer}" in message and f"schema {SCHEMA_VERSION}" in message
    assert "upgrade nightshift" in message
    # left as it was: not moved aside, not written
    assert list(tmp_path.glob("*.bak")) == []
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert _version(conn) == str(newer)
        assert conn.execute("SELECT COUNT(*) FROM events_seen").fetchone()[0] == applied


@pytest.mark.parametrize(
    ("statements", "found_version", "missing"),
    [
        (["UPDATE meta SET value = '0' WHERE key = 'schema_version'"], 0, None),
        (["DELETE FROM meta"], 0, None),
        (["DROP TABLE meta"], 0, "meta"),
        (["ALTER TABLE variants DROP COLUMN llm_usd"], SCHEMA_VERSION, "variants.llm_usd"),
        (["DROP TABLE proposer_halts"], SCHEMA_VERSION, "proposer_halts"),
    ],
    ids=["version-0", "no-version-row", "no-meta-table", "missing-column", "missing-table"],
)
def test_an_older_schema_is_moved_aside_for_a_fresh_ledger(
    tmp_path: Path, statements: list[str], found_version: int, missing: str | None
) -> None:
    path = tmp_path / "ledger.db"
    _ledger(path)
    _edit(path, *statements)
    with capture_logs() as logs, contextlib.closing(open_db(path)) as conn:
        assert queries.events_applied(conn) == 0  # empty: the service replays the stream
        assert _version(conn) == str(SCHEMA_VERSION)
    [backup] = tmp_path.glob(f"ledger.db.v{found_version}-*.bak")
    [line] = [entry for entry in logs if entry["event"] == "ledger_schema_outdated"]
    assert line["found_version"] == found_version and line["schema_version"] == SCHEMA_VERSION
    assert line["backup"] == str(backup)
    if missing is not None:
        assert missing in line["missing"]
    with contextlib.closing(sqlite3.connect(backup)) as old:  # the old rows, kept
        assert old.execute("SELECT COUNT(*) FROM events_seen").fetchone()[0] > 0


def test_an_empty_file_becomes_a_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    path.touch()
    with contextlib.closing(open_db(path)) as conn:
        assert _version(conn) == str(SCHEMA_VERSION)
    assert list(tmp_path.glob("*.bak")) == []


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    path.write_bytes(b"not sqlite at all, but long enough to have a header" * 4)
    with pytest.raises(LedgerError, match="is not a ledger"):
        open_db(path)
    assert list(tmp_path.glob("*.bak")) == []
