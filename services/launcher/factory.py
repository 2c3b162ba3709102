"""The backend a launcher runs on, chosen by the `backend` setting."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import msgspec

from services.apikey import KEY_FILE, load_api_key
from services.launcher.backend import Backend, is_secret_name
from services.launcher.local import LocalBackend
from services.launcher.output import OutputLimits
from services.launcher.sandbox import resolve_sandbox
from services.launcher.sim import SimBackend, SimParams
from services.launcher.skypilot_adapter import PoolAdapter, SkyAdapter

if TYPE_CHECKING:
    from services.launcher.skypilot_adapter import SdkAdapter
from services.settings import Settings, SettingsError
from services.telemetry import get_logger

ENV_SECRET_MIN_CHARS = 8  # an environment value this short is no credential worth a redaction

_sky: list[SkyAdapter] = []  # one SkyPilot client per process, made on first use
_client: list[SdkAdapter] = []
_pool: list[PoolAdapter] = []  # the tests put a fake pool here; else the SDK client


def _sdk() -> SdkAdapter:
    if not _client:
        try:
            from services.launcher.skypilot_adapter import SdkAdapter
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise SettingsError(
                "backend 'skypilot' needs the SkyPilot SDK: pip install 'nightshift[skypilot]'"
            ) from exc
        _client.append(SdkAdapter())
    return _client[0]


def sky_adapter() -> SkyAdapter:
    """The SkyPilot SDK (the tests put their fake here)."""
    if not _sky:
        _sky.append(_sdk())
    return _sky[0]


def pool_adapter() -> PoolAdapter:
    """SkyPilot's managed jobs, on the same SDK client (the tests put their fake pool here)."""
    return _pool[0] if _pool else _sdk()


def make_backend(settings: Settings, launcher_id: str) -> Backend:
    if settings.backend == "local":
        return make_local_backend(settings)
    if settings.backend == "sim":
        params = msgspec.convert(settings, SimParams, from_attributes=True)
        return SimBackend(params, slots=settings.slots, host=f"sim-{launcher_id}")
    if settings.backend == "skypilot":
        from services.launcher import skypilot_tiers as st
        from services.launcher.skypilot import SkyPilotBackend

        tier = st.tier_of(settings)  # settings checked before the SDK is imported
        template = st.load_template(settings.skypilot_template)
        if tier.mode == "pool":
            from services.launcher.skypilot_pool import SkyPoolBackend

            return SkyPoolBackend(
                pool_adapter(),
                tier,
                template,
                settings.runs_path,
                prefix=settings.skypilot_cluster_prefix,
            )
        return SkyPilotBackend(
            sky_adapter(),
            tier,
            template,
            settings.runs_path,
            prefix=settings.skypilot_cluster_prefix,
        )
    raise SettingsError(f"backend {settings.backend!r} is unknown; set NIGHTSHIFT_BACKEND")


def make_local_backend(settings: Settings, env: dict[str, str] | None = None) -> LocalBackend:
    env = dict(os.environ) if env is None else env
    extra = [Path(p.strip()).expanduser() for p in settings.sandbox_read_only.split(",")]
    sandbox = resolve_sandbox(settings.sandbox)
    if sandbox is not None:
        get_logger(component="launcher").info(
            "runs_sandboxed", bwrap=sandbox.binary, network=settings.sandbox_network
        )
    return LocalBackend(
        settings.runs_path,
        gpus=settings.gpus,
        slots=settings.slots,
        sandbox=sandbox,
        read_only=[p for p in extra if str(p) != "."],
        data_cache=data_cache(env),
        hidden=secret_paths(settings, env),
        network=settings.sandbox_network,
        limits=OutputLimits(
            max_bytes=settings.run_log_max_bytes,
            rate_bytes_s=settings.run_output_bytes_s,
            secrets=known_secrets(settings, env),
        ),
    )


def data_cache(env: dict[str, str]) -> Path:
    """Where the trainer's prepare.py keeps prepared data (its NIGHTSHIFT_CACHE)."""
    return Path(env.get("NIGHTSHIFT_CACHE") or "~/.cache/nightshift").expanduser()


def secret_paths(settings: Settings, env: dict[str, str]) -> list[Path]:
    """Files and directories no run may see, even where they lie under a path it may read:
    the NATS credentials, the Anthropic key file, the ledger, the campaign's home."""
    key_file = env.get("NIGHTSHIFT_ANTHROPIC_KEY_FILE") or str(KEY_FILE)
    paths = [settings.nats_creds, key_file, str(settings.ledger_path), settings.home]
    return [Path(p).expanduser() for p in paths if p]


def known_secrets(settings: Settings, env: dict[str, str]) -> list[str]:
    """Every secret value this process knows of, to be redacted from the runs' logs: the
    NATS password and token (also inside the URL), the lines of the NATS credentials file,
    the Anthropic key, and the value of any environment variable named like a credential."""
    found = [settings.nats_password, settings.nats_token]
    for server in settings.nats_url.split(","):
        with contextlib.suppress(ValueError):
            parts = urlsplit(server.strip())
            found += [
                parts.password or "",
                (parts.username or "") if parts.password is None else "",
            ]
    if settings.nats_creds:
        try:
            text = Path(settings.nats_creds).expanduser().read_text()
        except OSError:
            text = ""
        found += [line for line in text.splitlines() if line and not line.startswith("-")]
    found.append(load_api_key(env) or "")
    found += [v for k, v in env.items() if is_secret_name(k) and len(v) >= ENV_SECRET_MIN_CHARS]
    return sorted({s for s in found if s})
