"""A trainer is code a model wrote: under the sandbox it cannot read the user's keys or the
launcher's environment, nor write anywhere but its run directory (issue 12, findings 1-2).

Each attack runs twice: without a sandbox it succeeds (the threat is real and the test can
fail), inside bubblewrap it fails and the attacked files are unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from services.launcher.factory import make_local_backend
from services.launcher.gpus import Gpu, driver_gpus, gpu_access
from services.launcher.local import LocalBackend
from services.launcher.sandbox import Bubblewrap, RunMounts, bubblewrap_problem, resolve_sandbox
from services.process_lifetime import die_with_parent
from services.settings import Settings
from tests.launcher_helpers import job as make_job

BWRAP = shutil.which("bwrap")
BWRAP_PROBLEM = bubblewrap_problem(BWRAP) if BWRAP else "bwrap is not installed"
needs_bwrap = pytest.mark.skipif(
    bool(BWRAP_PROBLEM),
    reason=f"bubblewrap cannot sandbox here ({BWRAP_PROBLEM}); apt-get install bubblewrap",
)
SECRET = "sk-ant-sandbox-test-0123456789"

# Each attack prints "<name>: ok" when it worked and "<name>: denied <error>" when not.
ATTACKS = """
import json, os, sqlite3, sys
T = json.loads(TARGETS)
def attack(name, fn):
    try:
        fn()
        print(name + ": ok", flush=True)
    except Exception as exc:
        print(name + ": denied " + type(exc).__name__, flush=True)
def read(path):
    if T["secret"] not in open(path).read():
        raise LookupError("no secret in " + path)
def environ_anywhere():
    for pid in os.listdir("/proc"):
        try:
            if T["secret"].encode() in open("/proc/%s/environ" % pid, "rb").read():
                return
        except (OSError, ValueError):
            pass
    raise LookupError("no process environment holds the secret")
def write(path):
    with open(path, "a") as fh:
        fh.write("pwned\\n")
def rewrite_ledger():
    db = sqlite3.connect(T["ledger"], timeout=1)
    db.execute("UPDATE results SET value = 0.0001")
    db.commit()
attack("key_file", lambda: read(T["key_file"]))
attack("creds_file", lambda: read(T["creds_file"]))
attack("creds_in_readable", lambda: read(T["cache"] + "/../nats.creds"))
attack("parent_environ", lambda: read("/proc/%d/environ" % T["launcher_pid"]))
attack("any_environ", environ_anywhere)
attack("campaign_home", lambda: write(T["home"] + "/pwned.txt"))
attack("data_cache", lambda: write(T["cache"] + "/meta.json"))
attack("ledger", rewrite_ledger)
attack("harness", lambda: write(T["harness"] + "/prepare.py"))
attack("harness_copy", lambda: write("prepare.py"))
attack("own_dir", lambda: write("mine.txt"))
"""
ATTACK_NAMES = [
    "key_file",
    "creds_file",
    "creds_in_readable",
    "parent_environ",
    "any_environ",
    "campaign_home",
    "data_cache",
    "ledger",
    "harness",
    "harness_copy",
]


@pytest.fixture
def holder_of_secret() -> Iterator[int]:
    """A process with the secret in its environment, as the proposer has the API key."""
    env = dict(os.environ, ANTHROPIC_API_KEY=SECRET)
    proc = subprocess.Popen(["sleep", "60"], env=env)
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def world(tmp_path: Path, holder: int) -> tuple[dict[str, object], dict[Path, bytes], list[Path]]:
    """A user's machine in miniature: home with a key file, campaign home with ledger, NATS
    creds and harness, a data cache. Returns the attack targets, the files' contents and
    the paths the launcher hides (as the factory's secret_paths)."""
    home = tmp_path / "home"
    key_file = home / ".config" / "nightshift" / "anthropic_key"
    campaign = home / "project" / ".nightshift"
    harness = campaign / "runs" / "harness" / "k" / "trainer"
    cache = home / ".cache" / "nightshift" / "key"
    creds = home / "nats.creds"
    for d in (key_file.parent, harness, cache):
        d.mkdir(parents=True)
    key_file.write_text(SECRET)
    creds.write_text(f"-----BEGIN NKEY-----\n{SECRET}\n")
    # Credentials inside a path the run may read (as under /etc): masked all the same.
    shutil.copy(creds, cache.parent / "nats.creds")
    (harness / "prepare.py").write_text("print('prepared')\n")
    (cache / "meta.json").write_text("{}")
    ledger = campaign / "ledger.db"
    with sqlite3.connect(ledger) as db:
        db.execute("CREATE TABLE results (value REAL)")
        db.execute("INSERT INTO results VALUES (1.5)")
    files = [key_file, creds, harness / "prepare.py", cache / "meta.json", ledger]
    hidden = [cache.parent / "nats.creds", creds, key_file, ledger, campaign]
    targets = {
        "secret": SECRET,
        "key_file": str(key_file),
        "creds_file": str(creds),
        "launcher_pid": holder,
        "home": str(campaign),
        "cache": str(cache),
        "ledger": str(ledger),
        "harness": str(harness),
    }
    return targets, {f: f.read_bytes() for f in files}, hidden


async def attack(tmp_path: Path, holder: int, sandbox: Bubblewrap | None) -> dict[str, str]:
    targets, before, hidden = world(tmp_path, holder)
    campaign = Path(str(targets["home"]))
    harness = Path(str(targets["harness"]))
    cache = Path(str(targets["cache"])).parent
    backend = LocalBackend(campaign / "runs", sandbox=sandbox, data_cache=cache, hidden=hidden)
    # The targets (the secret among them) are in the source, not in the run's environment.
    source = f"TARGETS = {json.dumps(json.dumps(targets))}\n{ATTACKS}"
    job = make_job(source, "v1-default-0", campaign="camp", harness_dir=harness)
    outcome = await backend.run(job, lambda _: None)
    log = outcome.read_log()
    assert outcome.exit_code == 0, log
    results = dict(line.split(": ", 1) for line in log.splitlines() if ": " in line)
    if sandbox is not None:
        after = {f: f.read_bytes() if f.exists() else b"" for f in before}
        assert after == before, "a sandboxed run changed a file outside its run directory"
        assert not (campaign / "pwned.txt").exists()
    return results


async def test_without_a_sandbox_every_attack_works(tmp_path: Path, holder_of_secret: int) -> None:
    results = await attack(tmp_path, holder_of_secret, None)
    assert {name: results[name] for name in ATTACK_NAMES} == dict.fromkeys(ATTACK_NAMES, "ok")


@needs_bwrap
async def test_inside_bubblewrap_every_attack_fails(tmp_path: Path, holder_of_secret: int) -> None:
    sandbox = resolve_sandbox("bwrap")
    results = await attack(tmp_path, holder_of_secret, sandbox)
    # The campaign home of this test lies under /tmp, which in the sandbox is a private
    # tmpfs: the write lands there and vanishes (`attack` checks the real directory).
    # A real campaign home is not under /tmp, and the write fails.
    names = [name for name in ATTACK_NAMES if name != "campaign_home"]
    denied = {name: results[name].split()[0] for name in names}
    assert denied == dict.fromkeys(names, "denied"), results
    assert results["own_dir"] == "ok"  # the run directory stays writable


@needs_bwrap
async def test_a_sandboxed_run_reads_its_data_and_has_no_network(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "meta.json").write_text('{"tokens": 7}')
    harness = tmp_path / "harness"
    harness.mkdir()
    (harness / "helper.py").write_text("VALUE = 3\n")
    source = (
        "import json, os, socket, helper\n"
        "print('data', json.load(open(os.environ['NIGHTSHIFT_CACHE'] + '/meta.json'))['tokens'])\n"
        "print('helper', helper.VALUE, 'home', os.environ['HOME'])\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
        "    print('network on')\n"
        "except OSError as exc:\n"
        "    print('network off', type(exc).__name__)\n"
    )
    backend = LocalBackend(tmp_path / "runs", sandbox=resolve_sandbox("bwrap"), data_cache=cache)
    job = make_job(source, "v1-default-0", campaign="camp", harness_dir=harness)
    outcome = await backend.run(job, lambda _: None)
    log = outcome.read_log()
    assert outcome.exit_code == 0, log
    assert "data 7" in log and "helper 3 home /tmp" in log
    assert "network off" in log


def test_bwrap_mode_without_bubblewrap_is_an_error_that_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.launcher import sandbox

    monkeypatch.setattr(shutil, "which", lambda _: None)
    sandbox._warn_unsandboxed.cache_clear()
    with pytest.raises(sandbox.SandboxError, match="apt-get install bubblewrap"):
        sandbox.resolve_sandbox("bwrap")
    with structlog.testing.capture_logs() as logs:
        assert sandbox.resolve_sandbox("auto") is None  # falls back, with a warning
        assert sandbox.resolve_sandbox("auto") is None
        assert sandbox.resolve_sandbox("none") is None
    warnings = [e for e in logs if e["event"] == "runs_not_sandboxed"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert "not installed" in warnings[0]["problem"]


def test_the_launcher_knows_every_secret_it_must_redact(tmp_path: Path) -> None:
    creds = tmp_path / "nats.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\neyJhbGciOiJlZDI1NTE5\n------END------\n")
    settings = Settings(
        backend="local",
        sandbox="none",
        nats_url="nats://tok-abcdef123@a:4222,nats://u:pass-xyz987@b:4222",
        nats_password="pw-123456",
        nats_creds=str(creds),
        run_log_max_bytes=65536,
        run_output_bytes_s=1000,
    )
    env = {"ANTHROPIC_API_KEY": "sk-ant-xyz-1", "HF_TOKEN": "hf_abcdefgh", "PATH": "/usr/bin"}
    backend = make_local_backend(settings, env)
    assert backend.sandbox is None
    assert backend.limits.max_bytes == 65536 and backend.limits.rate_bytes_s == 1000
    assert set(backend.limits.secrets) >= {
        "tok-abcdef123",
        "pass-xyz987",
        "pw-123456",
        "eyJhbGciOiJlZDI1NTE5",
        "sk-ant-xyz-1",
        "hf_abcdefgh",
    }
    assert "/usr/bin" not in backend.limits.secrets
    # Masked in the sandbox even where they lie under a path a run may read.
    assert {creds, settings.ledger_path, Path(settings.home)} <= set(backend.hidden)
    assert sys.platform != "linux" or die_with_parent() is not None


def test_a_sandboxed_run_gets_its_gpu_node_and_uuid_only(tmp_path: Path) -> None:
    table, dev = tmp_path / "gpus", tmp_path / "dev"
    dev.mkdir()
    # Two GPUs whose device minors are not their indices (bus order 0: minor 3, 1: minor 0).
    for bus, minor, uuid in (("0000:3b:00.0", 3, "GPU-aaa"), ("0000:86:00.0", 0, "GPU-bbb")):
        (table / bus).mkdir(parents=True)
        (table / bus / "information").write_text(
            f"Model: \t\t NVIDIA H200\nGPU UUID: \t {uuid}\nDevice Minor: \t {minor}\n"
        )
    for node in ("nvidiactl", "nvidia-uvm", "nvidia0", "nvidia3"):
        (dev / node).touch()
    gpus = driver_gpus(table)
    assert gpus == [Gpu(0, 3, "GPU-aaa"), Gpu(1, 0, "GPU-bbb")]
    second = gpu_access(["1"], False, gpus, dev)
    assert second.devices == sorted(str(dev / n) for n in ("nvidiactl", "nvidia-uvm", "nvidia0"))
    assert second.visible == "GPU-bbb"
    everything = gpu_access([], True, gpus, dev)
    assert len(everything.devices) == 4 and everything.visible is None
    no_driver_table = gpu_access(["3"], False, [], dev)
    assert str(dev / "nvidia3") in no_driver_table.devices and no_driver_table.visible is None
    assert driver_gpus(tmp_path / "absent") == []
    argv = Bubblewrap("bwrap", gpu_table=gpus).wrap(["true"], RunMounts(tmp_path, gpus=["1"]))
    assert argv[argv.index("--setenv") + 1 : argv.index("--setenv") + 3] == [
        "CUDA_VISIBLE_DEVICES",
        "GPU-bbb",
    ]
