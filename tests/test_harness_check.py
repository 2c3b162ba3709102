"""A harness changed on disk (by a run outside the sandbox) is never run again: each run's
harness is checked against the archive's hashes and extracted anew when it differs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from services.launcher import harness as harness_mod
from services.launcher.harness import HarnessCache
from services.launcher.local import LocalBackend
from tests.launcher_helpers import harness_tar
from tests.launcher_helpers import job as make_job

PREPARE = "print('honest prepare')\n"


async def test_a_harness_rewritten_by_a_run_is_restored_before_the_next(tmp_path: Path) -> None:
    archive = harness_tar({"prepare.py": PREPARE, "helper.py": "VALUE = 3\n"})
    fetches: list[str] = []

    async def fetch(key: str) -> bytes:
        fetches.append(key)
        return archive

    cache = HarnessCache(tmp_path / "harness", fetch)
    backend = LocalBackend(tmp_path / "runs")  # no sandbox: the run can write the harness
    harness = await cache.get("h1")
    evil = (
        f"open({str(harness / 'prepare.py')!r}, 'w').write('print(\"evil\")')\n"
        f"open({str(harness / 'helper.py')!r}, 'a').write('VALUE = 4\\n')\n"
    )
    first = await backend.run(make_job(evil, "a-default-0", harness_dir=harness), print)
    assert first.exit_code == 0
    assert "evil" in (harness / "prepare.py").read_text()  # the attack worked on disk

    again = await cache.get("h1")
    assert (again / "prepare.py").read_text() == PREPARE
    assert (again / "helper.py").read_text() == "VALUE = 3\n"
    check = "import helper\nprint('helper', helper.VALUE)\n"
    second = await backend.run(make_job(check, "b-default-0", harness_dir=again), print)
    assert "helper 3" in second.read_log()
    assert "honest prepare" in (again / ".prepare.log").read_text()
    assert await cache.get("h1") == again and fetches == ["h1", "h1"]  # unchanged: no fetch


async def test_a_checked_harness_is_hashed_again_only_when_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thousand runs that start together must not hash the harness in turn: a file whose
    stamp is unchanged since it was hashed is not hashed again. A same-size rewrite with its
    modification time set back still changes its change time, and is caught."""
    archive = harness_tar({"prepare.py": PREPARE})

    async def fetch(key: str) -> bytes:
        return archive

    cache = HarnessCache(tmp_path / "harness", fetch)
    await cache.get("h1")  # extracted
    root = await cache.get("h1")  # hashed and stamped
    hashed: list[Path] = []
    real = harness_mod.changed_files
    monkeypatch.setattr(harness_mod, "changed_files", lambda d, g: hashed.append(d) or real(d, g))
    assert await asyncio.gather(*(cache.get("h1") for _ in range(50))) == [root] * 50
    assert hashed == []
    prepare = root / "prepare.py"
    before = prepare.stat()
    await asyncio.sleep(0.05)  # past the file system's clock tick
    prepare.write_text(PREPARE.replace("honest", "forged"))  # the same size
    os.utime(prepare, ns=(before.st_atime_ns, before.st_mtime_ns))
    again = await cache.get("h1")
    assert len(hashed) == 1 and (again / "prepare.py").read_text() == PREPARE
