"""The ledger's SQLite schema and connections (WAL, synchronous=NORMAL, foreign keys).

The database is a projection of the event stream: every table can be rebuilt by replaying
the stream into an empty file. That is how a ledger on an older schema is upgraded:
`open_db` moves the old file aside and starts an empty one, and the service, finding it
empty, replays the whole stream into it. A file on a newer schema is refused.

`events_seen` makes every event handler idempotent (an event id is applied at most once)
and remembers the events each one published (its outbox), so a redelivery republishes
exactly the same events.

Events may arrive out of order (a redelivered message lands after later ones): an event
that names a variant or run not applied yet is not recorded as a placeholder but waits
for it, and is dead-lettered if it never comes (apply.py: a ledger that accepts only what
happened).
"""

from __future__ import annotations

import functools
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from services.telemetry import get_logger

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS events_seen (
    event_id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    campaign TEXT NOT NULL,
    ts REAL NOT NULL,
    outbox TEXT NOT NULL DEFAULT '[]'   -- JSON array of the events this one published
);

CREATE TABLE IF NOT EXISTS campaigns (
    name TEXT PRIMARY KEY,
    config TEXT,                        -- the CampaignStarted event as JSON (NULL: not seen yet)
    metric TEXT NOT NULL DEFAULT 'val_bpb',
    direction TEXT NOT NULL DEFAULT 'minimize',
    keep_rule TEXT NOT NULL DEFAULT 'strict',
    edit_file TEXT NOT NULL DEFAULT 'train.py',
    status TEXT NOT NULL DEFAULT 'running',   -- running | stopped | completed
    started_at REAL,
    stopped_at REAL,
    stop_reason TEXT,
    stop_detail TEXT,
    best_variant_id TEXT,
    best_value REAL,
    best_runs INTEGER NOT NULL DEFAULT 0,
    halted_reason TEXT,
    halted_detail TEXT
);

CREATE TABLE IF NOT EXISTS sources (
    digest TEXT PRIMARY KEY,
    text TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS variants (
    variant_id TEXT PRIMARY KEY,
    campaign TEXT NOT NULL REFERENCES campaigns(name),
    parent_id TEXT,
    source_digest TEXT,
    diff TEXT NOT NULL DEFAULT '',
    title TEXT NOT NULL DEFAULT '',
    rationale TEXT NOT NULL DEFAULT '',
    proposer TEXT NOT NULL DEFAULT '',
    wave INTEGER NOT NULL DEFAULT 0,
    proposed_at REAL,                   -- when the VariantProposed was applied
    llm_model TEXT,
    llm_input_tokens REAL NOT NULL DEFAULT 0,
    llm_cache_creation_input_tokens REAL NOT NULL DEFAULT 0,
    llm_cache_read_input_tokens REAL NOT NULL DEFAULT 0,
    llm_output_tokens REAL NOT NULL DEFAULT 0,
    llm_usd REAL NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'pending',   -- pending | keep | discard | crash
    verdict TEXT,                       -- the latest rule decision (undecided while replicating)
    value REAL,                         -- mean of the metric over the ok runs
    ok_runs INTEGER NOT NULL DEFAULT 0,
    decided_at REAL,
    evaluated_seq INTEGER               -- order of the first result (results.tsv order)
);
CREATE INDEX IF NOT EXISTS variants_campaign ON variants(campaign, proposed_at);
CREATE INDEX IF NOT EXISTS variants_campaign_value ON variants(campaign, value);

CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    campaign TEXT NOT NULL REFERENCES campaigns(name),
    variant_id TEXT NOT NULL REFERENCES variants(variant_id),
    tier TEXT NOT NULL,
    replica INTEGER NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'requested',  -- requested | running | finished | evaluated
                                        -- | cancelled (by the ledger before it started)
    requested_at REAL,
    request_reason TEXT,
    backend TEXT,
    host TEXT,
    accelerator TEXT,
    slot INTEGER,
    started_at REAL,
    finished_at REAL,
    exit_code INTEGER,
    timed_out INTEGER NOT NULL DEFAULT 0,
    cancelled INTEGER NOT NULL DEFAULT 0,
    infra_failure INTEGER NOT NULL DEFAULT 0,
    infra_reason TEXT NOT NULL DEFAULT '',
    log_key TEXT,
    log_tail TEXT,
    cancel_requested_at REAL,           -- the ledger cancelled it: a decision made it useless
    cancel_reason TEXT
);
CREATE INDEX IF NOT EXISTS runs_variant ON runs(variant_id);
CREATE INDEX IF NOT EXISTS runs_campaign_state ON runs(campaign, state);

-- GPU time and dollars of every attempt of a run (skypilot meters them). An attempt that
-- ended in an infrastructure failure is the campaign's cost, not its variant's.
CREATE TABLE IF NOT EXISTS run_costs (
    run_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    campaign TEXT NOT NULL,
    variant_id TEXT NOT NULL,
    tier TEXT NOT NULL,
    gpu_seconds REAL NOT NULL,
    gpu_usd REAL NOT NULL,
    infra_failure INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, attempt)
);
CREATE INDEX IF NOT EXISTS run_costs_variant ON run_costs(variant_id);
CREATE INDEX IF NOT EXISTS run_costs_campaign ON run_costs(campaign);

CREATE TABLE IF NOT EXISTS run_logs (
    run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
    text TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS results (
    run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
    campaign TEXT NOT NULL,
    variant_id TEXT NOT NULL,
    tier TEXT NOT NULL,
    replica INTEGER NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 1,
    status TEXT NOT NULL,
    value REAL,
    metrics TEXT NOT NULL DEFAULT '{}',
    crash_reason TEXT NOT NULL DEFAULT '',
    training_seconds REAL NOT NULL DEFAULT 0,
    evaluated_at REAL NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0      -- the ledger's apply order
);
CREATE INDEX IF NOT EXISTS results_variant ON results(variant_id);
CREATE INDEX IF NOT EXISTS results_campaign ON results(campaign, evaluated_at);

CREATE TABLE IF NOT EXISTS keep_decisions (
    event_id TEXT PRIMARY KEY,          -- the VariantDecided (or the ResultEvaluated of a crash)
    campaign TEXT NOT NULL,
    variant_id TEXT NOT NULL,
    run_id TEXT NOT NULL,               -- the result that led to the decision
    status TEXT NOT NULL,               -- keep | discard | undecided | crash
    value REAL,                         -- the candidate's mean
    runs INTEGER NOT NULL,              -- the candidate's ok runs
    rule TEXT NOT NULL,
    best_before_variant_id TEXT,
    best_before_value REAL,             -- the best's mean
    best_before_runs INTEGER NOT NULL DEFAULT 0,
    tier TEXT NOT NULL DEFAULT '',
    noise REAL,                         -- the spread the rule used
    margin REAL,                        -- the improvement it required at these n
    reason TEXT NOT NULL DEFAULT '',
    replicates_requested INTEGER NOT NULL DEFAULT 0,
    runs_cancelled INTEGER NOT NULL DEFAULT 0,  -- runs still out that the decision cancelled
    decided_at REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS noise (
    campaign TEXT NOT NULL,
    tier TEXT NOT NULL,
    noise REAL NOT NULL,                -- pooled std of one run
    dof INTEGER NOT NULL,
    variants INTEGER NOT NULL,
    measured_at REAL NOT NULL,
    PRIMARY KEY (campaign, tier)
);
CREATE INDEX IF NOT EXISTS keep_decisions_variant ON keep_decisions(variant_id);

CREATE TABLE IF NOT EXISTS best_history (
    id INTEGER PRIMARY KEY,
    campaign TEXT NOT NULL,
    variant_id TEXT NOT NULL,
    value REAL NOT NULL,
    previous_variant_id TEXT,
    previous_value REAL,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS best_history_campaign ON best_history(campaign, ts);

CREATE TABLE IF NOT EXISTS dead_letters (
    event_id TEXT PRIMARY KEY,
    campaign TEXT NOT NULL,
    subject TEXT NOT NULL,
    stream_seq INTEGER NOT NULL,
    consumer TEXT NOT NULL,
    error TEXT NOT NULL,
    payload_preview TEXT NOT NULL DEFAULT '',
    ts REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS proposer_halts (
    event_id TEXT PRIMARY KEY,
    campaign TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    ts REAL NOT NULL
);
"""


class LedgerError(RuntimeError):
    """The ledger database cannot be used (not a ledger, a newer schema)."""


@dataclass(frozen=True)
class FoundSchema:
    """What an existing file holds: its schema version and what it lacks of this build's."""

    version: int | None  # None: an empty file (a new ledger); 0: no version recorded
    missing: tuple[str, ...] = ()  # tables and `table.column`s of SCHEMA the file lacks

    @property
    def outdated(self) -> bool:
        """Older than this build (by its version or by what it lacks): to be rebuilt."""
        if self.version is None or self.version > SCHEMA_VERSION:
            return False
        return self.version < SCHEMA_VERSION or bool(self.missing)


def _configure(conn: sqlite3.Connection) -> None:
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = NORMAL")


@functools.cache
def expected_columns() -> dict[str, frozenset[str]]:
    """Every table of SCHEMA and its columns, read from an in-memory database built by it."""
    mem = sqlite3.connect(":memory:")
    try:
        mem.executescript(SCHEMA)
        return {table: _columns(mem, table) for table in _tables(mem)}
    finally:
        mem.close()


def _tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
    return [str(row[0]) for row in rows]


def _columns(conn: sqlite3.Connection, table: str) -> frozenset[str]:
    return frozenset(str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})"))


def inspect_schema(conn: sqlite3.Connection) -> FoundSchema:
    """The schema of the file behind `conn`, compared with this build's."""
    tables = set(_tables(conn))
    if not tables:
        return FoundSchema(None)
    missing: list[str] = []
    for table, columns in expected_columns().items():
        if table not in tables:
            missing.append(table)
        else:
            missing.extend(f"{table}.{c}" for c in sorted(columns - _columns(conn, table)))
    row = None
    if "meta" in tables:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    try:
        version = int(row[0]) if row is not None else 0
    except ValueError:
        version = 0  # not a version this or any build wrote: as old as no version at all
    return FoundSchema(version, tuple(missing))


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    _configure(conn)
    return conn


def _inspect_file(path: Path) -> FoundSchema:
    """Read the schema of the file at `path` (closing it, so its WAL is checkpointed)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        _configure(conn)
        return inspect_schema(conn)
    except sqlite3.DatabaseError as exc:  # "file is not a database", a damaged header
        raise LedgerError(
            f"{path} is not a ledger ({exc}); point NIGHTSHIFT_LEDGER_DB at another file"
        ) from exc
    finally:
        conn.close()


def move_aside(path: Path, version: int) -> Path:
    """Rename an outdated ledger (and its -wal/-shm files) to `<name>.v<version>-<time>.bak`."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    backup = path.with_name(f"{path.name}.v{version}-{stamp}.bak")
    n = 1
    while backup.exists():
        n += 1
        backup = path.with_name(f"{path.name}.v{version}-{stamp}-{n}.bak")
    for suffix in ("-wal", "-shm"):
        extra = Path(f"{path}{suffix}")
        if extra.exists():
            extra.rename(f"{backup}{suffix}")
    path.rename(backup)
    return backup


def open_db(path: Path | str) -> sqlite3.Connection:
    """Open (creating if needed) the ledger for writing: WAL, synchronous=NORMAL, foreign keys.

    A file on an older schema (an older version, no version, or missing tables or columns)
    is moved aside and an empty ledger created in its place, for the service to rebuild
    from the stream; a file on a newer schema raises LedgerError naming both versions.
    The connection is in autocommit mode (`isolation_level=None`); the projection opens
    one explicit transaction per event.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    found = _inspect_file(path) if path.exists() else FoundSchema(None)
    if found.version is not None:
        if found.version > SCHEMA_VERSION:
            raise LedgerError(
                f"{path} has ledger schema {found.version}, newer than schema "
                f"{SCHEMA_VERSION} that this build understands; upgrade nightshift or point "
                "NIGHTSHIFT_LEDGER_DB elsewhere"
            )
        if found.outdated:
            backup = move_aside(path, found.version)
            get_logger(service="ledger").warning(
                "ledger_schema_outdated",
                ledger=str(path),
                found_version=found.version,
                schema_version=SCHEMA_VERSION,
                missing=list(found.missing[:20]),
                backup=str(backup),
                action="rebuilding from the stream",
            )
    conn = _connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(SCHEMA)
        conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
    except BaseException:  # close what was opened (sqlite3.Error, a cancellation), then re-raise
        conn.close()
        raise
    return conn


def open_read(path: Path | str) -> sqlite3.Connection:
    """A read-only connection for the API and the CLI; usable while the service writes."""
    path = Path(path)
    if not path.exists():
        raise LedgerError(
            f"no ledger at {path}: start nightshift (`nightshift up`) or set NIGHTSHIFT_LEDGER_DB"
        )
    conn = _connect(path)
    conn.execute("PRAGMA query_only = ON")
    return conn
