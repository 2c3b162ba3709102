"""Distributed mode in tests: each service its own process (`python -m services.<name>`),
a campaign started with the CLI, the ledger's HTTP API asked how it is going."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx

from services.process_lifetime import stop_all
from tests.e2e_helpers import REPO
from tests.eventually import eventually

SERVICES = ("ledger", "evaluator", "launcher", "proposer")


class Fleet:
    """The services as child processes (several of one service under their own names),
    each restartable on its own."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, service: str = "", **env: str) -> None:
        """Start `python -m services.<service>` (default: `name`) as `name`, its output in
        `<name>.log`, with `env` on top of the fleet's environment."""
        log = (self.logs / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", f"services.{service or name}"],
            env={**self.env, **env},
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> None:
        stop_all(self.procs.values(), timeout_s=20)


def start_campaign_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "campaign", "start", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def campaign_status(home: Path, name: str) -> str:
    url_file = home / "ledger.url"
    if not url_file.exists():
        return ""
    async with httpx.AsyncClient(base_url=url_file.read_text().strip(), timeout=5) as http:
        try:
            response = await http.get(f"/campaigns/{name}")
        except httpx.HTTPError:
            return ""
        return str(response.json().get("status", "")) if response.status_code == 200 else ""


async def wait_completed(home: Path, name: str, timeout: float) -> None:
    async def completed() -> bool:
        return await campaign_status(home, name) == "completed"

    try:
        await eventually(completed, timeout, f"campaign {name} to complete", interval=0.3)
    except AssertionError as exc:
        logs = "\n".join(
            f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(home.glob("*.log"))
        )
        raise AssertionError(f"{exc}; {logs}") from exc
