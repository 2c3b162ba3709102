"""`nightshift status | best | results`: the file reader and the HTTP reader (the real API,
served by uvicorn) give the same answers for the same ledger."""

from __future__ import annotations

import argparse
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from services.ledger.api import create_app
from services.ledger.db import open_db
from services.ledger.projection import apply_event
from services.ledger.service import bind_http
from services.ledger_client import (
    FileLedgerReader,
    HttpLedgerReader,
    LedgerReader,
    LedgerUnavailable,
    format_dead_letters,
    format_status,
    reader_for,
    show,
)
from services.settings import Settings
from tests.synthetic import synthetic_campaign


@pytest.fixture(scope="module")
def ledger_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ledger with a finished campaign `demo` and a campaign `fresh` with no best yet."""
    path = tmp_path_factory.mktemp("client") / "ledger.db"
    items = synthetic_campaign("demo", variants=8, seed=7)
    items += synthetic_campaign("fresh", variants=1, stop=False, t0=1_800_000_000.0)[:3]
    with contextlib.closing(open_db(path)) as conn:
        for event, source, log in items:
            apply_event(conn, event, source_text=source, log_text=log)
    return path


@pytest.fixture(scope="module")
def ledger_url(ledger_path: Path) -> Iterator[str]:
    """The real API over the ledger, served by uvicorn on a free port in a thread."""
    sock = bind_http("127.0.0.1", 0)
    server = uvicorn.Server(
        uvicorn.Config(create_app(ledger_path), log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(params=["file", "http"])
def reader(request: pytest.FixtureRequest, ledger_path: Path) -> LedgerReader:
    if request.param == "file":
        return FileLedgerReader(ledger_path)
    url: str = request.getfixturevalue("ledger_url")
    return HttpLedgerReader(url)


def test_both_readers_give_the_same_answers(ledger_path: Path, ledger_url: str) -> None:
    on_disk, over_http = FileLedgerReader(ledger_path), HttpLedgerReader(ledger_url)
    assert [c["name"] for c in on_disk.campaigns()] == ["demo", "fresh"]
    assert over_http.campaigns() == on_disk.campaigns()
    for name in ("demo", "fresh"):
        assert over_http.summary(name) == on_disk.summary(name)
        assert over_http.results_tsv(name) == on_disk.results_tsv(name)
    source = on_disk.best_source("demo")
    assert "LR = " in source and over_http.best_source("demo") == source
    assert on_disk.results_tsv("demo").startswith("commit\tval_bpb\t")


def test_unknown_campaign_and_no_best_are_lookup_errors(reader: LedgerReader) -> None:
    with pytest.raises(LookupError, match="unknown campaign 'nope'"):
        reader.summary("nope")
    with pytest.raises(LookupError, match="unknown campaign 'nope'"):
        reader.results_tsv("nope")
    with pytest.raises(LookupError, match="'nope'"):
        reader.best_source("nope")
    with pytest.raises(LookupError, match="campaign 'fresh' has no best variant yet"):
        reader.best_source("fresh")


def _show(command: str, settings: Settings, url: str | None, **extra: str | None) -> int:
    args = argparse.Namespace(url=url, campaign="demo", output=None)
    for key, value in extra.items():
        setattr(args, key, value)
    return show(command, settings, args)


def test_show_prints_the_same_from_either_reader(
    ledger_path: Path, ledger_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    settings = Settings(ledger_db=str(ledger_path))
    printed = {}
    for command in ("status", "best", "results"):
        assert _show(command, settings, None) == 0
        on_disk = capsys.readouterr().out
        assert _show(command, settings, ledger_url) == 0
        assert capsys.readouterr().out == on_disk
        printed[command] = on_disk
    summary = FileLedgerReader(ledger_path).summary("demo")
    letters = FileLedgerReader(ledger_path).dead_letters()
    assert (
        printed["status"]
        == format_status(summary) + "\n" + format_dead_letters(letters, "demo") + "\n"
    )
    assert printed["status"].startswith("campaign demo: completed")
    assert printed["best"] == FileLedgerReader(ledger_path).best_source("demo")
    output = tmp_path / "best.py"
    assert _show("best", settings, ledger_url, output=str(output)) == 0
    assert output.read_text() == printed["best"]


def test_reader_for_picks_http_with_a_url_and_the_file_otherwise(
    ledger_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NIGHTSHIFT_LEDGER_URL", raising=False)
    settings = Settings(ledger_db=str(ledger_path))
    assert isinstance(reader_for(settings, None), FileLedgerReader)
    chosen = reader_for(settings, "http://127.0.0.1:1/")
    assert isinstance(chosen, HttpLedgerReader) and chosen.url == "http://127.0.0.1:1"
    monkeypatch.setenv("NIGHTSHIFT_LEDGER_URL", "http://127.0.0.1:2")
    assert isinstance(
        reader_for(Settings(ledger_db=str(tmp_path / "absent.db")), None), HttpLedgerReader
    )
    monkeypatch.delenv("NIGHTSHIFT_LEDGER_URL")
    with pytest.raises(LedgerUnavailable, match="no ledger at"):
        reader_for(Settings(ledger_db=str(tmp_path / "absent.db")), None)


def test_an_unreachable_ledger_is_a_connection_error() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionError, match="cannot reach the ledger"):
        HttpLedgerReader(f"http://127.0.0.1:{port}", timeout_s=2).campaigns()


def test_status_shows_undecodable_and_other_campaigns_dead_letters() -> None:
    letters = [
        {"campaign": "demo", "error": "ResultEvaluated x names run r, which no launcher started"},
        {"campaign": "?", "error": "malformed event"},
        {"campaign": "evil", "error": "never proposed"},
    ]
    shown = format_dead_letters(letters, "demo")
    assert "dead letters: 1 (GET /campaigns/demo/deadletters); latest: ResultEvaluated" in shown
    assert "other or unreadable campaigns: 2 (1 undecodable; GET /deadletters)" in shown
