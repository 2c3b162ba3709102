"""The skypilot backend against the real SkyPilot library (no cloud reachable here).

Every task the backend builds goes through `sky.Task.from_yaml_config` and back; the
template loads with `sky.Task.from_yaml`; and the calls that need no cluster run against a
real SkyPilot API server started offline (`sky api start` with HOME in a temporary
directory), in a child process so its HOME and client state stay apart from this one.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from services.launcher import skypilot_tiers as st
from services.settings import SkyTier

sky = pytest.importorskip(
    "sky", reason="the skypilot extra is not installed (make venv installs it)"
)

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "deploy" / "skypilot" / "task.yaml"
API_PORT = 46580  # the local API server's fixed port


def _round_trip(config: dict[str, Any]) -> dict[str, Any]:
    """The task as SkyPilot reads it, checked to read back to itself."""
    # from_yaml_config consumes the mapping it is given: each read gets its own copy.
    out: dict[str, Any] = sky.Task.from_yaml_config(copy.deepcopy(config)).to_yaml_config()
    out.pop("_user_specified_yaml", None)
    again: dict[str, Any] = sky.Task.from_yaml_config(copy.deepcopy(out)).to_yaml_config()
    again.pop("_user_specified_yaml", None)
    assert again == out
    return out


def test_the_template_and_every_task_built_from_it_are_valid_skypilot_tasks(tmp_path: Path) -> None:
    task = sky.Task.from_yaml(str(TEMPLATE))
    assert "prepare.py" in (task.setup or "") and task.run is None
    template = st.load_template(TEMPLATE)
    tier = SkyTier(name="validate", accelerator="H200:8", clusters=3, infra="k8s/lab", spot=True)
    launch = _round_trip(st.launch_task(template, tier, tmp_path, "gpu"))
    assert launch["resources"]["accelerators"] == {"H200": 8}
    assert launch["resources"]["infra"] == "kubernetes/lab" and launch["resources"]["use_spot"]
    assert launch["workdir"] == str(tmp_path) and "run" not in launch
    assert launch["envs"]["NIGHTSHIFT_PROFILE"] == "gpu"
    run = _round_trip(
        st.exec_task(
            template,
            tier,
            tmp_path,
            run_id="v1-validate-2",
            edit_file="train.py",
            profile="gpu",
            replica=2,
        )
    )
    assert run["resources"]["accelerators"] == {"H200": 1}  # one GPU of the cluster per run
    assert run["envs"]["NIGHTSHIFT_RUN_ID"] == "v1-validate-2"
    assert run["envs"]["NIGHTSHIFT_SEED"] == "2" and "setup" not in run
    assert st.EXIT_MARKER in run["run"] and "python train.py" in run["run"]


def test_the_pool_and_its_jobs_are_valid_skypilot_tasks(tmp_path: Path) -> None:
    template = st.load_template(TEMPLATE)
    tier = SkyTier(name="screen", accelerator="H100:1", clusters=13, infra="k8s/lab", spot=True)
    pool = _round_trip(st.pool_task(template, tier, tmp_path, "gpu"))
    assert pool["service"]["pool"] == {"workers": 13}  # SkyPilot reads `pool:` as a pool spec
    assert pool["workdir"] == str(tmp_path) and "prepare.py" in pool["setup"]
    assert pool["resources"]["accelerators"] == {"H100": 1} and "run" not in pool
    source = "print('ünïcode')\nEXIT = 0\n"
    kw = {"run_id": "v1-screen-1", "edit_file": "train.py", "profile": "gpu", "replica": 1}
    run = _round_trip(st.pool_job_task(template, tier, source=source, **kw))  # type: ignore[arg-type]
    # A pool job carries no workdir, setup or file mounts; the same resources as a worker.
    assert "workdir" not in run and "setup" not in run and not run.get("file_mounts")
    assert run["resources"] == {"accelerators": {"H100": 1}}
    assert run["envs"]["NIGHTSHIFT_RUN_ID"] == "v1-screen-1"
    work = tmp_path / "sky_workdir"
    work.mkdir()
    script = run["run"].split("cd ")[0]  # the part that writes the file
    env = {"NIGHTSHIFT_RUN_ID": "v1-screen-1", "PATH": os.environ["PATH"]}
    subprocess.run(["bash", "-c", script], cwd=work, env=env, check=True)
    assert (work / "runs" / "v1-screen-1" / "train.py").read_text() == source


# Run in a child process: HOME is the temporary directory, the API server is started and
# stopped there, and the backend's real adapter makes the calls.
API_CHECK = r"""
import asyncio, json, subprocess, sys, time
from pathlib import Path
from services.launcher.skypilot import SkyPilotBackend
from services.launcher.skypilot_adapter import ClusterGone, SdkAdapter, SkyError
from services.launcher.skypilot_pool import SkyPoolBackend
from services.launcher.backend import Job
from services.settings import SkyTier

async def main(tmp):
    adapter = SdkAdapter()
    out = {}
    t = time.monotonic()
    out["clusters"] = await adapter.clusters()
    out["status_s"] = time.monotonic() - t
    for name, call in (("job_status", adapter.job_status("ns-x-0", 1)),
                       ("cancel", adapter.cancel("ns-x-0", 1)), ("down", adapter.down("ns-x-0"))):
        try:
            await call
            out[name] = "no error"
        except ClusterGone as exc:
            out[name] = "ClusterGone: " + str(exc)
    tier = SkyTier(name="x", accelerator="H100:1", clusters=1, usd_per_gpu_hour=2.0)
    backend = SkyPilotBackend(adapter, tier, {"setup": "true"}, Path(tmp) / "runs")
    harness = Path(tmp) / "harness"
    harness.mkdir()
    job = Job(run_id="v-x-0", variant_id="v", campaign="c", replica=0, source="print(1)",
              harness_dir=harness)
    t = time.monotonic()
    outcome = await backend.run(job, lambda line: None)
    out["launch_s"] = time.monotonic() - t
    out["run"] = {"infra": outcome.infra_failure, "reason": outcome.infra_reason,
                  "exit_code": outcome.exit_code, "slots_after": backend.slots}
    for name, call in (("jobs_status", adapter.jobs_status(1)), ("jobs_cancel", adapter.jobs_cancel(1)),
                       ("pool_down", adapter.pool_down("ns-x")),
                       ("jobs_launch", adapter.jobs_launch({"run": "true"}, "ns-x", "r"))):
        try:
            await call
            out[name] = "no error"
        except SkyError as exc:
            out[name] = type(exc).__name__ + ": " + str(exc)
    out["jobs_tail_logs"] = [line async for line in adapter.jobs_tail_logs(1)]
    pool_tier = SkyTier(name="x", accelerator="H100:1", clusters=2, mode="pool")
    pool = SkyPoolBackend(adapter, pool_tier, {"setup": "true"}, Path(tmp) / "pool-runs")
    outcome = await pool.run(job, lambda line: None)
    out["pool_run"] = {"infra": outcome.infra_failure, "reason": outcome.infra_reason,
                       "exit_code": outcome.exit_code}
    print(json.dumps(out))

asyncio.run(main(sys.argv[1]))
"""

UNREACHABLE_CHECK = r"""
import asyncio
from services.launcher.skypilot_adapter import ApiUnreachable, SdkAdapter
try:
    asyncio.run(SdkAdapter().clusters())
except ApiUnreachable as exc:
    print("ApiUnreachable:", exc)
"""


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start_api_server(sky_cli: str, env: dict[str, str], home: Path) -> None:
    """`sky api start`, tried twice: its own wait for the server is 60 s, and a CI run once
    saw it give up. A failure shows what the CLI printed and the server's own log."""
    failures = []
    for _ in range(2):
        done = subprocess.run(
            [sky_cli, "api", "start"], env=env, timeout=150, capture_output=True, text=True
        )
        if done.returncode == 0:
            return
        log = home / ".sky" / "api_server" / "server.log"
        server_log = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
        failures.append(f"{done.stdout[-1500:]}{done.stderr[-1500:]}\nserver.log:\n{server_log}")
        subprocess.run([sky_cli, "api", "stop"], env=env, timeout=60, capture_output=True)
    pytest.fail("`sky api start` failed twice:\n" + "\n----\n".join(failures))


def _uvicorn_too_new() -> bool:
    """SkyPilot 0.14's API server needs uvicorn < 0.36 (it says so in its requirements)."""
    major, minor = (int(p) for p in importlib.metadata.version("uvicorn").split(".")[:2])
    return (major, minor) >= (0, 36)


@pytest.mark.slow
@pytest.mark.skipif(
    _uvicorn_too_new(),
    reason="uvicorn >= 0.36 is installed, which SkyPilot 0.14's API server cannot run on; "
    "`make lock` (with the skypilot extra) pins it below 0.36",
)
@pytest.mark.skipif(
    _port_busy(API_PORT), reason=f"port {API_PORT} is taken (another SkyPilot API server)"
)
def test_real_api_server_calls_map_to_infra_failures(tmp_path: Path) -> None:
    env = {
        **os.environ, "HOME": str(tmp_path), "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
        "PYTHONPATH": str(REPO),
    }  # fmt: skip
    env.pop("SKYPILOT_API_SERVER_ENDPOINT", None)
    sky_cli = str(Path(sys.executable).parent / "sky")
    t = time.monotonic()
    _start_api_server(sky_cli, env, tmp_path)
    started_s = time.monotonic() - t
    try:
        done = subprocess.run(
            [sys.executable, "-c", API_CHECK, str(tmp_path)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        subprocess.run([sky_cli, "api", "stop"], env=env, timeout=60, capture_output=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"real API server: started in {started_s:.1f}s, first sky.status {out['status_s']:.1f}s, "
        f"failed launch {out['launch_s']:.1f}s"
    )
    assert out["clusters"] == []
    for call in ("job_status", "cancel", "down"):
        assert out[call].startswith("ClusterGone: ClusterDoesNotExist"), out
    # A launch cannot fetch the catalog offline: CloudError -> the run is an infra failure.
    run = out["run"]
    assert run["infra"] and run["exit_code"] is None and "CloudError" in run["reason"], run
    assert "could not be launched or set up" in run["reason"] and run["slots_after"] == 0
    # Managed jobs offline: no jobs controller is up (ClusterNotUpError), mapped to a gone
    # controller; a pool cannot be applied (CloudError: no catalog) -> an infra failure.
    for call in ("jobs_status", "jobs_cancel", "pool_down"):
        assert out[call].startswith("ClusterGone: ClusterNotUpError"), out
    assert out["jobs_launch"].startswith("LaunchFailed: NoCloudAccessError"), out
    assert out["jobs_tail_logs"] == []
    pool_run = out["pool_run"]
    assert pool_run["infra"] and pool_run["exit_code"] is None, pool_run
    assert "could not be applied: CloudError" in pool_run["reason"], pool_run
    env["SKYPILOT_API_SERVER_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there
    down = subprocess.run(
        [sys.executable, "-c", UNREACHABLE_CHECK], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert "ApiUnreachable: ApiServerConnectionError" in down.stdout, down.stderr[-2000:]
