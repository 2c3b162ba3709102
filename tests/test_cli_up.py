"""`nightshift up` as a user runs it: a subprocess, its own nats-server, Ctrl-C, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.broker import EmbeddedNats
from tests.e2e_helpers import REPO

CLI = [sys.executable, "-m", "services.cli"]


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "NIGHTSHIFT_"))}
    env.update(
        {
            "NIGHTSHIFT_HOME": str(home),
            "NIGHTSHIFT_HTTP_PORT": "0",
            "NIGHTSHIFT_SIM_TIME_SCALE": str(0.3 / 300.0),
            "NIGHTSHIFT_LOG_FORMAT": "json",
        }
    )
    env.update(extra)
    return env


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def up_args(
    campaign: str,
    backend: str = "sim",
    slots: int | None = None,
    max_experiments: int | None = None,
    trainer: Path | None = None,
) -> list[str]:
    """`nightshift up`'s arguments; an option left as None is not passed."""
    args = ["up", "--backend", backend, "--campaign", campaign]
    for flag, value in (
        ("--slots", slots),
        ("--max-experiments", max_experiments),
        ("--trainer", trainer),
    ):
        if value is not None:
            args += [flag, str(value)]
    return args


def experiment_lines(stdout: str) -> list[str]:
    """The `[...]` line `nightshift up` prints for each finished experiment."""
    return [line for line in stdout.splitlines() if line.startswith("[")]


def assert_quiet(stderr: str) -> None:
    """A completed campaign or a Ctrl-C ends without a traceback or asyncio's complaints."""
    for noise in (
        "Traceback",
        "exception was never retrieved",
        "CancelledError",
        "Task was destroyed",
    ):
        assert noise not in stderr, stderr[-3000:]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split()[2] != "Z"


def test_up_runs_to_max_experiments_then_resume_reruns_nothing(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    first = run_cli(env, *up_args("cli", slots=2, max_experiments=8))
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(experiment_lines(first.stdout)) == 8, first.stdout
    assert "ledger + dashboard: http://" in first.stdout
    assert "completed" in first.stdout
    assert_quiet(first.stderr)

    results = run_cli(env, "results", "--campaign", "cli")
    assert results.returncode == 0, results.stderr
    rows = results.stdout.strip().splitlines()
    assert rows[0].split("\t") == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert len(rows) == 9

    out = tmp_path / "best.py"
    best = run_cli(env, "best", "--campaign", "cli", "-o", str(out))
    assert best.returncode == 0, best.stderr
    assert "DEPTH" in out.read_text() or "=" in out.read_text()
    status = run_cli(env, "status", "--campaign", "cli")
    assert status.returncode == 0 and "evaluated 8" in status.stdout, status.stdout

    again = run_cli(env, *up_args("cli", max_experiments=8))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished 8 experiments" in again.stdout
    more = run_cli(env, *up_args("cli", slots=2, max_experiments=11))
    assert more.returncode == 0, more.stderr[-3000:]
    assert len(experiment_lines(more.stdout)) == 3
    rows = run_cli(env, "results", "--campaign", "cli").stdout.strip().splitlines()
    assert len(rows) == 12
    assert len({r.split("\t")[0] for r in rows[1:]}) == 11


SLOW_TRAINER = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
with open(os.path.join(os.environ["PIDS_DIR"], f"{os.getpid()}-{child.pid}"), "w") as fh:
    fh.write("")
print("step 00001 (1.0%) | loss: 3.000000 | lrm: 1.00 | dt: 1ms | tok/sec: 1,000 | x", flush=True)
time.sleep(300)
"""


def test_ctrl_c_stops_everything_and_leaves_no_orphans(tmp_path: Path) -> None:
    trainer = tmp_path / "trainer"
    trainer.mkdir()
    (trainer / "train.py").write_text(f"LR = 0.01\n{SLOW_TRAINER}")
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    # The trainers report their pids in PIDS_DIR: outside the sandbox, whose own tests
    # (test_run_lifetime.py) show that its runs die with their launcher.
    env = cli_env(tmp_path / "home", PIDS_DIR=str(pids_dir), NIGHTSHIFT_SANDBOX="none")
    proc = subprocess.Popen(
        [*CLI, *up_args("ctrlc", backend="local", slots=2, trainer=trainer)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while len(list(pids_dir.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    trainers = [tuple(int(x) for x in p.name.split("-")) for p in pids_dir.iterdir()]
    assert len(trainers) == 2, "two trainer processes should be running"
    server_pid = _nats_server_pid(tmp_path / "home")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopping (Ctrl-C)" in stdout
    assert_quiet(stderr)
    time.sleep(0.5)
    for parent, child in trainers:
        assert not alive(parent) and not alive(child), "a trainer process outlived Ctrl-C"
    assert server_pid is not None and not alive(server_pid), "nats-server outlived Ctrl-C"


def _nats_server_pid(home: Path) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            cmdline
            and cmdline[0].endswith(b"nats-server")
            and str(home).encode() in b" ".join(cmdline)
        ):
            return int(entry.name)
    return None


def test_up_against_a_broker_that_requires_a_password(tmp_path: Path) -> None:
    """`nightshift up` with NATS_URL: the supervisor's own connections carry the credentials
    from the settings too (they used to be dropped), and nothing prints the password."""
    server = EmbeddedNats(tmp_path / "nats", user="lab", password="pw-7c1e").start()
    try:
        env = cli_env(
            tmp_path / "home",
            NATS_URL=server.url,
            NIGHTSHIFT_NATS_USER="lab",
            NIGHTSHIFT_NATS_PASSWORD="pw-7c1e",
        )
        done = run_cli(env, *up_args("auth", slots=2, max_experiments=4))
        assert done.returncode == 0, done.stderr[-3000:]
        assert len(experiment_lines(done.stdout)) == 4
        assert "pw-7c1e" not in done.stdout + done.stderr
        assert_quiet(done.stderr)
        refused = run_cli({**env, "NIGHTSHIFT_NATS_PASSWORD": "nope"}, *up_args("auth"), timeout=60)
        assert refused.returncode == 1
        assert "refused" in refused.stderr and "NIGHTSHIFT_NATS_PASSWORD" in refused.stderr
        assert_quiet(refused.stderr)
    finally:
        server.stop()
