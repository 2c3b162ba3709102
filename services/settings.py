"""Configuration: defaults < `nightshift.toml` < environment variables < command-line flags.

Every field `name` can be set by the environment variable `NIGHTSHIFT_<NAME>` (upper case)
or by the key `name` in `nightshift.toml` (in the working directory, or the file named by
`NIGHTSHIFT_CONFIG`). `NATS_URL` is also read as is, as every NATS tool does.
Secrets (ANTHROPIC_API_KEY, NATS credentials) are not settings: they stay in the
environment or a secrets file and are never logged.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import msgspec


class SettingsError(ValueError):
    """A setting with a bad value; the message names the setting and where it came from."""


class Settings(msgspec.Struct, kw_only=True):
    # --- broker ---------------------------------------------------------------------
    nats_url: str = ""  # empty: `nightshift up` starts a private nats-server
    nats_creds: str = ""  # path to a NATS credentials file (never logged)
    subject_prefix: str = "ns"
    home: str = ".nightshift"  # embedded state: nats store, ledger, run directories

    # --- ledger ---------------------------------------------------------------------
    ledger_db: str = ""  # default: <home>/ledger.db
    http_host: str = "127.0.0.1"
    http_port: int = 8780  # 0: any free port

    # --- launcher -------------------------------------------------------------------
    backend: str = "local"  # local | sim
    slots: int = 1
    tier: str = "default"
    launcher_id: str = ""  # default: hostname-pid
    run_dir: str = ""  # default: <home>/runs
    gpus: str = ""  # comma-separated CUDA device ids, one slot each ("" = CPU slots)
    log_tail_lines: int = 60
    ack_wait_s: float = 30.0  # a run whose launcher stops heartbeating is redelivered after this
    sim_time_scale: float = 0.002  # sim: seconds of wall time per second of budget
    sim_budget_s: float = 300.0  # sim: the training budget a simulated run "trains" for
    sim_noise: float = 7e-4  # sim: run-to-run spread of val_bpb (std)
    sim_failure_rate: float = 0.5  # sim: failure chance for a value far from its optimum
    sim_seed: int = 0

    # --- proposer -------------------------------------------------------------------
    strategy: str = "auto"  # auto (claude when an API key is configured, else grid) | grid | claude
    lookahead: int = 0  # variants queued beyond the slots; 0: a quarter of the slots, >= 2
    wave_size: int = 0  # 0: follow free capacity
    noise_floor: float = 0.0  # run-to-run spread of the metric; 0: 0.017 on cpu, 7e-4 on gpu
    model: str = ""  # claude: default model when empty
    budget_usd: float = 0.0  # claude: 0 = no cap
    budget_requests: int = 0  # claude: 0 = no cap
    claude_timeout_s: float = 240.0  # claude: one request (the SDK's timeout)
    claude_max_retries: int = 4  # claude: SDK retries on 429 / 5xx / 529 overloaded
    claude_max_tokens: int = 32000  # claude: output budget of one request, thinking included
    claude_effort: str = ""  # claude: output_config.effort when set
    claude_price: str = ""  # claude: "$in,$out[,$cache_write,$cache_read]" per million tokens

    # --- campaign -------------------------------------------------------------------
    campaign: str = "default"
    trainer_dir: str = "trainer"
    edit_file: str = "train.py"
    metric: str = "val_bpb"
    direction: str = "minimize"
    profile: str = "cpu"
    max_experiments: int = 0  # 0: until stopped
    run_timeout_s: float = 600.0
    keep_rule: str = "strict"

    # --- telemetry ------------------------------------------------------------------
    log_format: str = ""  # json | console; default: console on a TTY, else json
    log_level: str = "info"

    @property
    def ledger_path(self) -> Path:
        return Path(self.ledger_db) if self.ledger_db else Path(self.home) / "ledger.db"

    @property
    def runs_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(self.home) / "runs"


_FIELDS = {f.name: f for f in msgspec.structs.fields(Settings)}


def _coerce(name: str, raw: Any, origin: str) -> Any:
    """Turn a raw toml/env value into the field's type, with an error naming its origin."""
    default = _FIELDS[name].default
    try:
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            return str(raw).strip().lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(
            f"setting {name!r} from {origin} must be a {type(default).__name__}, got {raw!r}"
        ) from exc


def load_settings(
    overrides: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Settings:
    """Build the settings from the file, the environment and explicit overrides (flags)."""
    env = dict(os.environ) if env is None else env
    values: dict[str, Any] = {}
    path = Path(config_file or env.get("NIGHTSHIFT_CONFIG") or "nightshift.toml")
    if path.is_file():
        with path.open("rb") as fh:
            data = tomllib.load(fh)
        for key, raw in data.items():
            if key not in _FIELDS:
                raise SettingsError(f"unknown setting {key!r} in {path}")
            values[key] = _coerce(key, raw, str(path))
    if env.get("NATS_URL"):
        values["nats_url"] = env["NATS_URL"]
    for name in _FIELDS:
        var = f"NIGHTSHIFT_{name.upper()}"
        if var in env and env[var] != "":
            values[name] = _coerce(name, env[var], f"${var}")
    for name, raw in (overrides or {}).items():
        if raw is None:
            continue
        if name not in _FIELDS:
            raise SettingsError(f"unknown setting {name!r}")
        values[name] = _coerce(name, raw, "the command line")
    settings = Settings(**values)
    validate_settings(settings)
    return settings


def validate_settings(s: Settings) -> None:
    if s.backend not in ("local", "sim", "skypilot"):
        raise SettingsError(f"backend must be local, sim or skypilot, got {s.backend!r}")
    if s.direction not in ("minimize", "maximize"):
        raise SettingsError(f"direction must be minimize or maximize, got {s.direction!r}")
    if s.slots < 1:
        raise SettingsError(f"slots must be >= 1, got {s.slots}")
    if s.max_experiments < 0:
        raise SettingsError(f"max_experiments must be >= 0, got {s.max_experiments}")
    if s.run_timeout_s <= 0:
        raise SettingsError(f"run_timeout_s must be > 0, got {s.run_timeout_s}")
