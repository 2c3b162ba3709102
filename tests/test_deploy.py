"""The deployment files, checked without a Docker engine.

The compose files are resolved by a real compose implementation (`docker-compose config`,
Debian's docker-compose package); every command they run must exist (a module of this
package, or a nats-server whose config file the real nats-server accepts with the
environment compose gives it), and every environment variable they give the services must be
one the services read, with a value the settings accept. The image's health check runs
against a real ledger process.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import opentelemetry.sdk.environment_variables as otel_env
import pytest
import yaml

from services.broker import EmbeddedNats, free_port, nats_server_binary
from services.settings_loader import SETTING_FIELDS, convert_setting
from tests.e2e_helpers import REPO, spawn_service
from tests.eventually import eventually

DEPLOY = REPO / "deploy"
SERVICE_MODULES = {f"services.{name}" for name in ("ledger", "evaluator", "proposer", "launcher")}
HAS_SKYPILOT = "skypilot" in SETTING_FIELDS["backend"].choices
COMPOSE_SETS = [
    pytest.param(["docker-compose.yml"], id="single"),
    pytest.param(["docker-compose.yml", "docker-compose.cluster.yml"], id="cluster"),
    pytest.param(
        ["docker-compose.yml", "docker-compose.skypilot.yml"],
        id="skypilot",
        marks=pytest.mark.skipif(
            not HAS_SKYPILOT, reason="the skypilot backend is not in this build's settings"
        ),
    ),
]
needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose not installed (Debian package docker-compose)",
)
PASSWORD = "compose-pw-77ab"
TIERS = '[{"name":"h100","accelerator":"H100:1","clusters":2}]'

# Environment variables the services read besides their settings (NIGHTSHIFT_<NAME>).
READ_BY_SERVICES = {"NATS_URL", "ANTHROPIC_API_KEY"}
OTEL_SDK_VARS = {name for name in dir(otel_env) if name.startswith("OTEL_")}


def compose_config(files: list[str], env_file: Path, home: Path) -> dict[str, Any]:
    done = subprocess.run(
        ["docker-compose", "--env-file", str(env_file)]
        + [arg for f in files for arg in ("-f", str(DEPLOY / f))]
        + ["config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
    )
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    """deploy/.env as a user makes it from .env.example: the password filled in."""
    text = (DEPLOY / ".env.example").read_text()
    text = text.replace("NATS_PASSWORD=\n", f"NATS_PASSWORD={PASSWORD}\n")
    text += f"NIGHTSHIFT_SKYPILOT_TIERS={TIERS}\n"
    path = tmp_path / ".env"
    path.write_text(text)
    return path


def our_services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in config["services"].items() if s.get("image") == "nightshift:latest"}


def nats_nodes(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in config["services"].items() if "nats:" in str(s.get("image"))}


@needs_compose
@pytest.mark.parametrize("files", COMPOSE_SETS)
def test_compose_runs_the_four_services_with_settings_they_read(
    files: list[str], env_file: Path, tmp_path: Path
) -> None:
    config = compose_config(files, env_file, tmp_path)
    services = our_services(config)
    commands = {name: s["command"] for name, s in services.items()}
    assert {c[2] for c in commands.values()} == SERVICE_MODULES, commands
    for name, service in services.items():
        command = service["command"]
        assert command[:2] == ["python", "-m"], command
        assert importlib.util.find_spec(f"{command[2]}.__main__") is not None, command
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        for node in nats_nodes(config):
            assert service["depends_on"][node] == {"condition": "service_healthy"}, name
        for var, value in service["environment"].items():
            if var.startswith("NIGHTSHIFT_"):
                setting = var.removeprefix("NIGHTSHIFT_").lower()
                assert setting in SETTING_FIELDS, f"{name}: {var} is no setting"
                convert_setting(setting, value, f"{name}: ${var}")  # raises on a bad value
            else:
                assert var in READ_BY_SERVICES | OTEL_SDK_VARS, f"{name}: nothing reads {var}"
        env = service["environment"]
        assert env["NIGHTSHIFT_NATS_USER"] == "nightshift"
        assert env["NIGHTSHIFT_NATS_PASSWORD"] == PASSWORD
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://otel-collector:")
    ports = {p.split(":")[-2] for s in config["services"].values() for p in s.get("ports", [])}
    assert {"8780", "16686", "4222"} <= ports  # ledger, the trace viewer, NATS


@needs_compose
@pytest.mark.parametrize("files", COMPOSE_SETS[:2])
def test_compose_nats_nodes_start_from_their_config_and_require_a_login(
    files: list[str], env_file: Path, tmp_path: Path
) -> None:
    """Each NATS node's command and environment, run by the real nats-server in test
    mode (-t) against the config file compose mounts: valid, and with a login."""
    config = compose_config(files, env_file, tmp_path)
    nodes = nats_nodes(config)
    assert len(nodes) == (3 if "docker-compose.cluster.yml" in files else 1)
    replicas = {
        s["environment"].get("NIGHTSHIFT_REPLICAS", "1") for s in our_services(config).values()
    }
    assert replicas == ({"3"} if len(nodes) == 3 else {"1"})
    for name, node in nodes.items():
        assert "8222/healthz" in " ".join(node["healthcheck"]["test"]), name
        assert any(v.endswith(":/data:rw") for v in node["volumes"]), "the store is on a volume"
        mounts = dict(reversed(v.split(":")[:2]) for v in node["volumes"])
        command = node["command"]
        assert command[0] == "nats-server" and command[1] == "--config"
        host_conf = Path(mounts[command[2]])
        assert host_conf.is_file() and host_conf.parent == DEPLOY
        conf = host_conf.read_text()
        assert re.search(r"authorization \{\s*user: \$NATS_USER\s*password: \$NATS_PASSWORD", conf)
        assert node["environment"]["NATS_PASSWORD"] == PASSWORD
        checked = subprocess.run(
            [nats_server_binary(), "-c", str(host_conf), "-t"],
            env={**node["environment"], "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert checked.returncode == 0, checked.stderr + checked.stdout


@needs_compose
def test_compose_refuses_to_start_without_a_nats_password(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text((DEPLOY / ".env.example").read_text())  # NATS_PASSWORD left empty
    done = subprocess.run(
        [
            "docker-compose",
            "--env-file",
            str(env),
            "-f",
            str(DEPLOY / "docker-compose.yml"),
            "config",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert done.returncode != 0
    assert "set NATS_PASSWORD in deploy/.env" in done.stderr


def test_the_image_installs_the_lock_without_torch_and_runs_as_a_user() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "pip install --no-cache-dir -r requirements.lock" in dockerfile
    lock = (REPO / "requirements.lock").read_text()
    assert not re.search(r"^(torch|nvidia-|triton)", lock, re.MULTILINE)
    users = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    cmd = json.loads(re.search(r"^CMD (.+)$", dockerfile, re.MULTILINE)[1])  # type: ignore[index]
    assert cmd[:2] == ["python", "-m"] and cmd[2] in SERVICE_MODULES


def healthcheck_script() -> str:
    """The image's HEALTHCHECK command (a `python -c` script), as Docker would run it."""
    text = (DEPLOY / "Dockerfile").read_text()
    block = text[text.index("HEALTHCHECK") :]
    block = block[block.index("CMD ") + 4 : block.index('"]', block.index("CMD ")) + 2]
    argv = json.loads(block.replace("\\\n", ""))
    assert argv[:2] == ["python", "-c"]
    return str(argv[2])


@pytest.fixture
def ledger_process(tmp_path: Path, nats_server: EmbeddedNats) -> Iterator[int]:
    """A ledger service process on a free HTTP port; yields the port."""
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "NATS_URL": nats_server.url,
        "NIGHTSHIFT_HOME": str(tmp_path),
        "NIGHTSHIFT_HTTP_PORT": str(port),
        "NIGHTSHIFT_LOG_FORMAT": "json",
    }
    proc = spawn_service("ledger", env)
    yield port
    proc.terminate()
    proc.wait(20)


async def test_the_image_health_check_passes_for_a_serving_ledger_only(
    ledger_process: int, nats_server: EmbeddedNats
) -> None:
    script = healthcheck_script()

    def check(http_port: int) -> subprocess.CompletedProcess[str]:
        env = {"NATS_URL": nats_server.url, "NIGHTSHIFT_HTTP_PORT": str(http_port)}
        return subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30
        )

    await eventually(lambda: check(ledger_process).returncode == 0, 30, "a healthy ledger")
    refused = check(free_port())  # no ledger answers there
    assert refused.returncode != 0


@pytest.fixture
def deploy_nats(tmp_path: Path) -> Iterator[str]:
    """nats-server from deploy/nats.conf, as compose runs it (ports moved to free ones)."""
    port = free_port()
    env = {"NATS_USER": "nightshift", "NATS_PASSWORD": PASSWORD, "NATS_STORE_DIR": str(tmp_path)}
    argv = [nats_server_binary(), "-c", str(DEPLOY / "nats.conf"), "-a", "127.0.0.1"]
    argv += ["-p", str(port), "-m", str(free_port())]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"nats://127.0.0.1:{port}"
    try:
        wait_listening(port)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def wait_listening(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def start_service(name: str, url: str, home: Path, password: str) -> subprocess.Popen[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "NATS_URL": url,
        "NIGHTSHIFT_HOME": str(home),
        "NIGHTSHIFT_HTTP_PORT": "0",
        "NIGHTSHIFT_LOG_FORMAT": "json",
        "NIGHTSHIFT_NATS_USER": "nightshift",
        "NIGHTSHIFT_NATS_PASSWORD": password,
    }
    return spawn_service(name, env, capture=True)


async def test_a_wrong_nats_password_stops_each_service_at_start_naming_the_setting(
    deploy_nats: str, tmp_path: Path
) -> None:
    wrong = "wrong-pw-31c9"
    procs = {
        name: start_service(name, deploy_nats, tmp_path, wrong)
        for name in ("ledger", "evaluator", "proposer", "launcher")
    }
    good = start_service("evaluator", deploy_nats, tmp_path / "good", PASSWORD)
    try:
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 1, (name, out)
            assert "refused nightshift-" in out and "NIGHTSHIFT_NATS_PASSWORD" in out, out
            assert wrong not in out and PASSWORD not in out, f"{name} printed a password"
        # The same service with the password from deploy/.env connects and keeps serving.
        assert good.stdout is not None
        first = good.stdout.readline()
        assert json.loads(first)["event"] == "service_started", first
        assert good.poll() is None
    finally:
        good.terminate()
        good.communicate(timeout=20)
