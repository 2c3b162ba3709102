"""The local backend: real subprocesses, process groups, timeouts, scrubbed environments."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from services.launcher.backend import Job, is_secret_name, log_tail
from services.launcher.local import LocalBackend
from tests.eventually import eventually
from tests.launcher_helpers import job as make_job

OK_TRAIN = """
import os
print("step 00000 (0.0%) | loss: 9.000000 | lrm: 1.00 | dt: 10ms | tok/sec: 1,000 | x", flush=True)
print("step 00001 (50.0%) | loss: 8.000000 | lrm: 1.00 | dt: 10ms | tok/sec: 2,000 | x", end="\\r")
print("step 00002 (100.0%) | loss: 7.000000 | lrm: 1.00 | dt: 10ms | tok/sec: 3,000 | x")
print("---")
print("val_bpb:          0.997900")
print("profile:          0" if os.environ["NIGHTSHIFT_PROFILE"] == "cpu" else "profile: 1")
"""


def harness(tmp_path: Path, files: dict[str, str] | None = None) -> Path:
    root = tmp_path / "harness"
    root.mkdir(exist_ok=True)
    (root / "helper.py").write_text("VALUE = 3\n")
    for name, text in (files or {}).items():
        (root / name).write_text(text)
    return root


def job(tmp_path: Path, source: str, run_id: str = "v1-default-0", **kw: object) -> Job:
    fields: dict[str, object] = {
        "campaign": "camp",
        "harness_dir": tmp_path / "harness",
        "timeout_s": 30.0,
    }
    return make_job(source, run_id, **(fields | kw))


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


async def test_a_run_streams_lines_and_writes_its_log(tmp_path: Path) -> None:
    harness(tmp_path)
    backend = LocalBackend(tmp_path / "runs")
    lines: list[str] = []
    outcome = await backend.run(job(tmp_path, OK_TRAIN + "import helper\n"), lines.append)
    assert outcome.exit_code == 0 and not outcome.timed_out and not outcome.infra_failure
    assert outcome.log_path == tmp_path / "runs" / "camp" / "v1-default-0" / "run.log"
    assert (outcome.log_path.parent / "helper.py").is_file()  # the harness was copied
    assert [x for x in lines if x.startswith("step")] == [
        x for x in log_tail(OK_OUTPUT, 100).splitlines() if x.startswith("step")
    ]
    assert "val_bpb:          0.997900" in outcome.read_log()
    assert "profile:          0" in lines  # NIGHTSHIFT_PROFILE is the job's profile


OK_OUTPUT = "\n".join(
    f"step 0000{i} ({p}%) | loss: {9 - i}.000000 | lrm: 1.00 | dt: 10ms | tok/sec: {i + 1},000 | x"
    for i, p in enumerate(("0.0", "50.0", "100.0"))
)


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    harness(tmp_path)
    source = """
import signal, subprocess, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only the SIGKILL after the grace works
child = subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 60"])
open("child.pid", "w").write(str(child.pid))
print("started", flush=True)
time.sleep(60)
"""
    backend = LocalBackend(tmp_path / "runs", grace_s=0.5)
    t0 = time.monotonic()
    outcome = await backend.run(job(tmp_path, source, timeout_s=1.5), lambda _: None)
    assert time.monotonic() - t0 < 10
    assert outcome.timed_out and not outcome.cancelled and outcome.exit_code != 0
    child = int((tmp_path / "runs" / "camp" / "v1-default-0" / "child.pid").read_text())
    await eventually(
        lambda: not alive(child),
        timeout=5.0,
        what="the trainer's child to die with its process group",
    )
    assert not alive(child), "the trainer's child outlived the timeout"
    assert "[nightshift] timed out after 2s" in outcome.read_log()


async def test_an_exception_is_a_non_zero_exit_with_its_traceback(tmp_path: Path) -> None:
    harness(tmp_path)
    outcome = await LocalBackend(tmp_path / "runs").run(
        job(tmp_path, "print('hi')\nx = 1 / 0\n"), lambda _: None
    )
    assert outcome.exit_code not in (0, None) and not outcome.infra_failure
    tail = log_tail(outcome.read_log(), 5)
    assert tail.splitlines()[-1] == "ZeroDivisionError: division by zero"


async def test_the_trainer_environment_holds_no_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = {
        "ANTHROPIC_API_KEY": "sk-ant-1",
        "OPENAI_API_KEY": "sk-2",
        "NATS_URL": "nats://x:4222",
        "NATS_CREDS": "/creds",
        "NIGHTSHIFT_NATS_URL": "nats://y",
        "HF_TOKEN": "hf_3",
        "GITHUB_TOKEN": "gh",
        "AWS_SECRET_ACCESS_KEY": "aws",
        "AWS_ACCESS_KEY_ID": "id",
        "GOOGLE_APPLICATION_CREDENTIALS": "/g.json",
        "DB_PASSWORD": "pw",
        "MY_SECRET": "s",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NIGHTSHIFT_SEED", "7")
    monkeypatch.setenv("HARMLESS_SETTING", "kept")
    harness(tmp_path)
    source = "import json, os\njson.dump(dict(os.environ), open('env.json', 'w'))\n"
    backend = LocalBackend(tmp_path / "runs", gpus="3,5")
    assert backend.slots == 2
    outcome = await backend.run(
        job(tmp_path, source, profile="gpu", slot=1, replica=2), lambda _: None
    )
    assert outcome.exit_code == 0 and backend.placement(1)[1] == "cuda:5"
    env = json.loads((tmp_path / "runs" / "camp" / "v1-default-0" / "env.json").read_text())
    leaked = sorted(set(secrets) & set(env))
    assert leaked == []
    assert not any(value in env.values() for value in secrets.values())
    assert env["NIGHTSHIFT_PROFILE"] == "gpu" and env["CUDA_VISIBLE_DEVICES"] == "5"
    assert env["NIGHTSHIFT_SEED"] == "2"  # replica 2 runs another seed
    assert env["HARMLESS_SETTING"] == "kept"
    assert all(is_secret_name(name) for name in secrets)


async def test_prepare_runs_once_for_concurrent_runs(tmp_path: Path) -> None:
    prepare = (
        "import os, time\ntime.sleep(0.3)\n"
        "open('prepared.count', 'a').write(os.environ['NIGHTSHIFT_PROFILE'] + '\\n')\n"
    )
    root = harness(tmp_path, {"prepare.py": prepare})
    backend = LocalBackend(tmp_path / "runs", slots=2)
    source = "import os\nassert os.path.exists('prepared.count')\nprint('ok')\n"
    outcomes = await asyncio.gather(
        backend.run(job(tmp_path, source, "a-default-0"), lambda _: None),
        backend.run(job(tmp_path, source, "b-default-0", slot=1), lambda _: None),
    )
    assert [o.exit_code for o in outcomes] == [0, 0]
    assert (root / "prepared.count").read_text() == "cpu\n"
    again = await backend.run(job(tmp_path, source, "c-default-0"), lambda _: None)
    assert again.exit_code == 0 and (root / "prepared.count").read_text() == "cpu\n"


async def test_a_failing_prepare_is_an_infra_failure_with_its_tail(tmp_path: Path) -> None:
    harness(tmp_path, {"prepare.py": "print('downloading')\nraise SystemExit('no network')\n"})
    outcome = await LocalBackend(tmp_path / "runs").run(job(tmp_path, "print(1)\n"), lambda _: None)
    assert outcome.infra_failure and outcome.exit_code is None
    assert "prepare.py failed (exit 1)" in outcome.infra_reason
    assert "no network" in outcome.infra_reason


async def test_a_missing_harness_is_an_infra_failure(tmp_path: Path) -> None:
    outcome = await LocalBackend(tmp_path / "runs").run(job(tmp_path, "print(1)\n"), lambda _: None)
    assert outcome.infra_failure and "does not exist" in outcome.infra_reason
    assert "infrastructure failure" in outcome.read_log()


async def test_cancel_kills_the_run(tmp_path: Path) -> None:
    harness(tmp_path)
    backend = LocalBackend(tmp_path / "runs", grace_s=0.5)
    started = asyncio.Event()
    source = "import time\nprint('go', flush=True)\ntime.sleep(60)\n"
    task = asyncio.create_task(backend.run(job(tmp_path, source), lambda _: started.set()))
    await asyncio.wait_for(started.wait(), 10)
    await backend.cancel("v1-default-0", "campaign stopped")
    await backend.cancel("unknown-run")  # ignored
    outcome = await asyncio.wait_for(task, 10)
    assert outcome.cancelled and not outcome.timed_out
    assert "[nightshift] cancelled: campaign stopped" in outcome.read_log()


async def test_a_rerun_starts_from_a_clean_directory(tmp_path: Path) -> None:
    harness(tmp_path)
    backend = LocalBackend(tmp_path / "runs")
    await backend.run(job(tmp_path, "open('left.over', 'w')\n"), lambda _: None)
    outcome = await backend.run(
        job(tmp_path, "import os\nprint(os.path.exists('left.over'))\n"), lambda _: None
    )
    assert "False" in outcome.read_log()


def test_log_tail_splits_carriage_returns() -> None:
    assert log_tail("a\rb\r\nc\n\n", 2) == "b\nc\n"
    assert log_tail("", 5) == ""
    assert os.linesep == "\n"
