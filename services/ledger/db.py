"""The ledger's SQLite schema and connections (WAL, synchronous=NORMAL, foreign keys).

The database is a projection of the event stream: every table can be rebuilt by replaying
the stream into an empty file. `events_seen` makes every event handler idempotent (an event
id is applied at most once) and remembers the events each one published (its outbox), so a
redelivery republishes exactly the same events.

Rows may arrive out of order (a redelivered message lands after later ones), so run and
result handlers create placeholder rows for a campaign or variant they have not seen yet,
and the handlers of the missing events fill them in later.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

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
    proposed_at REAL,                   -- NULL: a placeholder (results arrived first)
    llm_model TEXT,
    llm_input_tokens REAL NOT NULL DEFAULT 0,
    llm_cache_creation_input_tokens REAL NOT NULL DEFAULT 0,
    llm_cache_read_input_tokens REAL NOT NULL DEFAULT 0,
    llm_output_tokens REAL NOT NULL DEFAULT 0,
    llm_usd REAL NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'pending',   -- pending | keep | discard | crash
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
    log_tail TEXT
);
CREATE INDEX IF NOT EXISTS runs_variant ON runs(variant_id);
CREATE INDEX IF NOT EXISTS runs_campaign_state ON runs(campaign, state);

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
    event_id TEXT PRIMARY KEY,          -- the ResultEvaluated that led to the decision
    campaign TEXT NOT NULL,
    variant_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    status TEXT NOT NULL,               -- keep | discard | crash
    value REAL,
    runs INTEGER NOT NULL,
    rule TEXT NOT NULL,
    best_before_variant_id TEXT,
    best_before_value REAL,
    decided_at REAL NOT NULL
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
    """The ledger database cannot be used (wrong file, newer schema)."""


def _configure(conn: sqlite3.Connection) -> None:
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = NORMAL")


def open_db(path: Path | str) -> sqlite3.Connection:
    """Open (creating if needed) the ledger for writing: WAL, synchronous=NORMAL, foreign keys.

    The connection is in autocommit mode (`isolation_level=None`); the projection opens
    one explicit transaction per event.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    _configure(conn)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(SCHEMA)
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        conn.execute(
            "INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
    elif int(row["value"]) > SCHEMA_VERSION:
        conn.close()
        raise LedgerError(
            f"{path} has ledger schema {row['value']}, newer than this build understands "
            f"({SCHEMA_VERSION}); upgrade nightshift or point NIGHTSHIFT_LEDGER_DB elsewhere"
        )
    return conn


def open_read(path: Path | str) -> sqlite3.Connection:
    """A read-only connection for the API and the CLI; usable while the service writes."""
    path = Path(path)
    if not path.exists():
        raise LedgerError(
            f"no ledger at {path}: start nightshift (`nightshift up`) or set NIGHTSHIFT_LEDGER_DB"
        )
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    _configure(conn)
    conn.execute("PRAGMA query_only = ON")
    return conn
