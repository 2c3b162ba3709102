"""The backend a launcher runs on, chosen by the `backend` setting."""

from __future__ import annotations

from services.launcher.backend import Backend
from services.launcher.local import LocalBackend
from services.launcher.sim import SimBackend
from services.launcher.skypilot_adapter import SkyAdapter
from services.settings import Settings, SettingsError

_sky: list[SkyAdapter] = []  # one SkyPilot client per process, made on first use


def sky_adapter() -> SkyAdapter:
    """The SkyPilot SDK (the tests put their fake here)."""
    if not _sky:
        try:
            from services.launcher.skypilot_adapter import SdkAdapter
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise SettingsError(
                "backend 'skypilot' needs the SkyPilot SDK: pip install 'nightshift[skypilot]'"
            ) from exc
        _sky.append(SdkAdapter())
    return _sky[0]


def make_backend(settings: Settings, launcher_id: str) -> Backend:
    if settings.backend == "local":
        return LocalBackend(settings.runs_path, gpus=settings.gpus, slots=settings.slots)
    if settings.backend == "sim":
        return SimBackend(
            slots=settings.slots,
            budget_s=settings.sim_budget_s,
            time_scale=settings.sim_time_scale,
            noise=settings.sim_noise,
            failure_rate=settings.sim_failure_rate,
            seed=settings.sim_seed,
            host=f"sim-{launcher_id}",
        )
    if settings.backend == "skypilot":
        from services.launcher import skypilot_tiers as st
        from services.launcher.skypilot import SkyPilotBackend

        tier = st.tier_of(settings)  # settings checked before the SDK is imported
        template = st.load_template(settings.skypilot_template)
        return SkyPilotBackend(
            sky_adapter(),
            tier,
            template,
            settings.runs_path,
            prefix=settings.skypilot_cluster_prefix,
        )
    raise SettingsError(f"backend {settings.backend!r} is unknown; set NIGHTSHIFT_BACKEND")
