"""The run-to-run spread of the metric to assume until replicate runs measure it."""

from __future__ import annotations

from services.proposer.strategy import ProposalRequest
from services.settings import Settings

# The seed's val_bpb spread over seeds on the cpu profile (README, The trainer); on a GPU
# autoresearch measured ~7e-4 (ProposalRequest's default).
CPU_NOISE_FLOOR = 0.017


def default_noise_floor(settings: Settings, profile: str) -> float:
    """NIGHTSHIFT_NOISE_FLOOR when set, else the figure measured for the profile."""
    if settings.noise_floor > 0:
        return settings.noise_floor
    return CPU_NOISE_FLOOR if profile == "cpu" else ProposalRequest.noise_floor
