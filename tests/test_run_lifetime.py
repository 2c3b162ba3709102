"""No process of a run outlives it (issue 12, finding 3), with and without bubblewrap; a run
is over when its trainer exits; a huge output is capped; secrets are redacted."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.contracts import RunFinished
from services.evaluator.classify import evaluate_run
from services.launcher.backend import RunOutcome
from services.launcher.local import LocalBackend
from services.launcher.output import OutputLimits
from services.launcher.sandbox import Bubblewrap, resolve_sandbox
from tests.e2e_helpers import REPO
from tests.eventually import eventually
from tests.launcher_helpers import job as make_job
from tests.test_launcher_local import alive
from tests.test_sandbox import BWRAP_PROBLEM, needs_bwrap

SANDBOXES = [
    pytest.param("none", id="no-sandbox"),
    pytest.param(
        "bwrap",
        id="bwrap",
        marks=pytest.mark.skipif(bool(BWRAP_PROBLEM), reason=f"no bubblewrap: {BWRAP_PROBLEM}"),
    ),
]

# Children that try to survive: one ignores SIGTERM, one starts its own session. Each
# prints a marker we find in /proc (pids inside a PID namespace mean nothing outside).
ESCAPERS = """
import signal, subprocess, sys, time
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"
subprocess.Popen([sys.executable, "-c", STUBBORN, "{tag}-stubborn"])
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", "{tag}-setsid"],
                 start_new_session=True)
time.sleep(0.5)  # both are up
"""


def escapers(tag: str) -> str:
    return ESCAPERS.replace("{tag}", tag)


def harness(tmp_path: Path) -> Path:
    root = tmp_path / "harness"
    root.mkdir(exist_ok=True)
    return root


def processes_tagged(tag: str) -> list[int]:
    """Live processes whose command line carries `tag` (zombies are dead)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if tag.encode() in cmdline and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def backend(tmp_path: Path, mode: str, **kw: object) -> LocalBackend:
    sandbox: Bubblewrap | None = resolve_sandbox("bwrap") if mode == "bwrap" else None
    return LocalBackend(tmp_path / "runs", grace_s=0.3, sandbox=sandbox, **kw)  # type: ignore[arg-type]


async def run_escapers(
    tmp_path: Path, mode: str, tag: str, rest: str, timeout_s: float
) -> RunOutcome:
    """Run a trainer that starts the escapers, then does `rest`; wait for the escapers'
    end (they must die with the run)."""
    job = make_job(
        escapers(tag) + rest,
        "v1-default-0",
        campaign="c",
        harness_dir=harness(tmp_path),
        timeout_s=timeout_s,
    )
    outcome = await backend(tmp_path, mode).run(job, lambda _: None)
    await eventually(lambda: not processes_tagged(tag), timeout=5.0, what="escapers to die")
    return outcome


@pytest.mark.parametrize("mode", SANDBOXES)
async def test_children_that_ignore_sigterm_or_setsid_die_with_a_timed_out_run(
    tmp_path: Path, mode: str
) -> None:
    tag = f"esc-timeout-{mode}-{os.getpid()}"
    rest = "print('started', flush=True)\ntime.sleep(3600)\n"
    outcome = await run_escapers(tmp_path, mode, tag, rest, timeout_s=2.0)
    assert outcome.timed_out
    assert "[nightshift] timed out after 2s" in outcome.read_log()
    # The reason names the configured timeout, not the slot's wall time (here made 9 s).
    finished = RunFinished(
        campaign="c",
        run_id="v1-default-0",
        variant_id="v1",
        tier="default",
        exit_code=outcome.exit_code,
        started_at=outcome.started_at,
        finished_at=outcome.started_at + 9.0,
        log_key="v1-default-0",
        log_tail="",
        timed_out=True,
    )
    evaluation = evaluate_run(finished, outcome.read_log())
    assert evaluation.crash_reason == "timed out after the run timeout of 2s; killed"


@pytest.mark.parametrize("mode", SANDBOXES)
async def test_a_trainer_that_exits_while_a_child_holds_its_output_is_finished_at_once(
    tmp_path: Path, mode: str
) -> None:
    tag = f"esc-finish-{mode}-{os.getpid()}"
    t0 = time.monotonic()
    outcome = await run_escapers(tmp_path, mode, tag, "print('---\\nval_bpb: 1.25')\n", 60.0)
    assert time.monotonic() - t0 < 15, "the run waited for its children's pipe"
    assert outcome.exit_code == 0 and not outcome.timed_out
    assert "val_bpb: 1.25" in outcome.read_log()


LAUNCHER = """
import asyncio, sys
from pathlib import Path
from services.contracts import RunFinished
from services.evaluator.classify import evaluate_run
from services.launcher.backend import RunOutcome
from services.launcher.local import LocalBackend
from services.launcher.sandbox import resolve_sandbox
from tests.launcher_helpers import job

async def main():
    root = Path(sys.argv[1])
    (root / "harness").mkdir(exist_ok=True)
    backend = LocalBackend(root / "runs", sandbox=resolve_sandbox("bwrap"))
    source = Path(sys.argv[2]).read_text() + "print('started', flush=True)\\nimport time\\ntime.sleep(3600)\\n"
    run = job(source, "v1-default-0", harness_dir=root / "harness", timeout_s=3600)
    await backend.run(run, lambda line: print(line, flush=True))

asyncio.run(main())
"""


@needs_bwrap
def test_a_sandboxed_run_dies_with_a_killed_launcher(tmp_path: Path) -> None:
    tag = f"esc-launcher-{os.getpid()}"
    escaping = tmp_path / "escapers.py"  # in a file: the launcher's argv must not hold the tag
    escaping.write_text(escapers(tag))
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(tmp_path), str(escaping)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert launcher.stdout is not None
        assert launcher.stdout.readline().strip() == "started"
        assert len(processes_tagged(tag)) == 2
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(10)
        deadline = time.monotonic() + 5
        while processes_tagged(tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_tagged(tag) == [], "a run's child outlived its SIGKILLed launcher"
    finally:
        launcher.kill()
        launcher.wait()


async def test_a_flood_of_output_keeps_head_and_tail_within_the_cap(tmp_path: Path) -> None:
    source = (
        "import sys\n"
        "print('first line', flush=True)\n"
        "block = ('x' * 99 + '\\n') * 10000\n"
        "for _ in range(200):\n"  # 200 MB
        "    sys.stdout.write(block)\n"
        "print('---')\nprint('val_bpb: 1.5')\n"
    )
    cap = 256 * 1024
    limits = OutputLimits(max_bytes=cap, rate_bytes_s=0)
    job = make_job(source, "v1-default-0", campaign="c", harness_dir=harness(tmp_path))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    outcome = await backend(tmp_path, "none", limits=limits).run(job, lambda _: None)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 50, f"the launcher's peak memory grew by {grown_mib:.0f} MiB"
    assert outcome.exit_code == 0
    assert outcome.log_path is not None
    size = outcome.log_path.stat().st_size
    assert cap <= size < cap + 1024, size
    log = outcome.read_log()
    assert log.startswith("first line\n")
    assert log.rstrip().endswith("val_bpb: 1.5")
    assert "bytes of output cut here" in log
    cut = int(log.split("[nightshift] ", 1)[1].split()[0])
    assert cut == 200 * 1_000_000 + len("first line\n---\nval_bpb: 1.5\n") - cap


async def test_the_output_rate_is_capped(tmp_path: Path) -> None:
    source = "import sys\nsys.stdout.write('y' * 3_000_000)\n"
    limits = OutputLimits(max_bytes=64 * 1024, rate_bytes_s=1_000_000)
    job = make_job(source, "v1-default-0", campaign="c", harness_dir=harness(tmp_path))
    t0 = time.monotonic()
    outcome = await backend(tmp_path, "none", limits=limits).run(job, lambda _: None)
    elapsed = time.monotonic() - t0
    assert outcome.exit_code == 0
    assert 1.5 < elapsed < 10, elapsed  # 3 MB at 1 MB/s with one second of burst: ~2 s


async def test_known_secrets_are_redacted_from_the_stored_log(tmp_path: Path) -> None:
    secret = "sk-ant-redact-me-42"
    source = (
        f"print('key is {secret[:8]}' + '{secret[8:]}')\n"
        f"raise SystemExit('failed with ' + '{secret[:5]}' + '{secret[5:]}')\n"
    )
    limits = OutputLimits(secrets=[secret, "pw"])  # too short to redact: left alone
    job = make_job(source, "v1-default-0", campaign="c", harness_dir=harness(tmp_path))
    outcome = await backend(tmp_path, "none", limits=limits).run(job, lambda _: None)
    log = outcome.read_log()
    assert secret not in log
    assert "key is [redacted]" in log and "failed with [redacted]" in log


def test_nats_server_dies_with_a_sigkilled_parent(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from services.broker import EmbeddedNats\n"
        "server = EmbeddedNats(sys.argv[1]).start()\n"
        "print(server.proc.pid, flush=True)\n"
        "time.sleep(3600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "nats")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        server = int(parent.stdout.readline())
        assert alive(server)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while alive(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(server), "the private nats-server outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.wait()


async def test_a_cancelled_supervision_kills_the_run(tmp_path: Path) -> None:
    tag = f"esc-cancel-{os.getpid()}"
    source = escapers(tag) + "print('started', flush=True)\ntime.sleep(3600)\n"
    started = asyncio.Event()
    job = make_job(source, "v1-default-0", campaign="c", harness_dir=harness(tmp_path))
    task = asyncio.create_task(backend(tmp_path, "none").run(job, lambda _: started.set()))
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: not processes_tagged(tag), timeout=5.0, what="escapers to die")
