"""The backend a launcher runs on, chosen by the `backend` setting."""

from __future__ import annotations

from services.launcher.backend import Backend
from services.launcher.local import LocalBackend
from services.launcher.sim import SimBackend
from services.settings import Settings, SettingsError


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
    raise SettingsError(
        f"backend {settings.backend!r} is not available in this launcher yet; "
        "set NIGHTSHIFT_BACKEND to local or sim"
    )
