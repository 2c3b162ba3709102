"""The fleet benchmark's service processes: each service as `python -m services.<name>`, as
a distributed deployment runs them, with the settings in its environment; how many of
each (`Topology`: launchers split the slots, proposers share campaigns by their lease).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import msgspec

from services.bench_stats import split_slots
from services.process_lifetime import stop_all
from services.runner import PROFILE_DIR_ENV
from services.settings import KeepRuleName, Settings


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a `python -m services.<name>` process these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTSHIFT_")}
    for f in msgspec.structs.fields(Settings):
        value = getattr(settings, f.name)
        if value != f.default:
            env[f"NIGHTSHIFT_{f.name.upper()}"] = str(value)
    env["NATS_URL"] = settings.nats_url
    return env


@dataclass(frozen=True)
class Topology:
    """How many processes of each service the benchmark starts (launchers split the slots)."""

    proposers: int = 1
    launchers: int = 1
    profile_dir: str = ""  # each service writes its cProfile statistics here when set
    keep_dir: str = ""  # the ledger, logs and stream are kept here (a new folder) when set
    keep_rule: KeepRuleName = "noise-aware"  # the campaign's (strict: no replicates)

    def processes(self, settings: Settings) -> list[tuple[str, str, Settings]]:
        """(label, service, settings) of each process."""
        named: list[tuple[str, str, Settings]] = [
            ("ledger", "ledger", settings),
            ("evaluator", "evaluator", settings),
        ]
        for i, slots in enumerate(split_slots(settings.slots, self.launchers)):
            label = "launcher" if self.launchers == 1 else f"launcher-{i}"
            replaced = msgspec.structs.replace(settings, slots=slots, launcher_id=f"bench-{i}")
            named.append((label, "launcher", replaced))
        for i in range(max(1, self.proposers)):
            named.append(
                ("proposer" if self.proposers <= 1 else f"proposer-{i}", "proposer", settings)
            )
        return named


class ServiceProcesses:
    """The services as separate processes, as a distributed deployment runs them."""

    def __init__(self, settings: Settings, topology: Topology | None = None) -> None:
        topology = topology or Topology()
        logs = Path(settings.home)
        if topology.profile_dir:
            Path(topology.profile_dir).mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for label, name, own in topology.processes(settings):
            env = settings_env(own)
            if topology.profile_dir:
                env[PROFILE_DIR_ENV] = topology.profile_dir
            self.procs[label] = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"],
                env=env,
                stdout=(logs / f"{label}.log").open("wb"),
                stderr=subprocess.STDOUT,
            )

    def pids(self) -> dict[str, int]:
        return {label: proc.pid for label, proc in self.procs.items()}

    def stop(self) -> None:
        stop_all(self.procs.values(), timeout_s=60)
