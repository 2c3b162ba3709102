"""The backend a launcher runs on, chosen by the `backend` setting."""

from __future__ import annotations

import msgspec

from services.launcher.backend import Backend
from services.launcher.local import LocalBackend
from services.launcher.sim import SimBackend, SimParams
from services.settings import Settings, SettingsError


def make_backend(settings: Settings, launcher_id: str) -> Backend:
    if settings.backend == "local":
        return LocalBackend(settings.runs_path, gpus=settings.gpus, slots=settings.slots)
    if settings.backend == "sim":
        params = msgspec.convert(settings, SimParams, from_attributes=True)
        return SimBackend(params, slots=settings.slots, host=f"sim-{launcher_id}")
    raise SettingsError(
        f"backend {settings.backend!r} is not available in this launcher yet; "
        "set NIGHTSHIFT_BACKEND to local or sim"
    )
