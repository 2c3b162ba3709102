"""What the claude strategy's tests share: a toy parent and its variants, requests, and the
scripted Messages API server with the client pointed at it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.contracts import CampaignStarted, ProposerConfig
from services.proposer.claude import ClaudeStrategy, build_claude_strategy
from services.proposer.strategy import ProposalRequest
from services.settings import Settings
from services.settings_loader import load_settings
from tests.fake_anthropic import FakeAnthropic, variant

CAMPAIGN = "c1"
PARENT = '''"""A toy train.py."""
import math

DEPTH = 4  # number of layers
MATRIX_LR = 0.04  # Muon learning rate
WEIGHT_DECAY = 0.2
WARMDOWN_RATIO = 0.5


def train() -> float:
    return 1.0 / math.log(2 + DEPTH * MATRIX_LR)


val_bpb = train()
print("---")
print(f"val_bpb:          {val_bpb:.6f}")
'''


def lr(value: str) -> dict[str, Any]:
    return variant(f"MATRIX_LR -> {value}", [("MATRIX_LR = 0.04", f"MATRIX_LR = {value}")])


def depth(value: int) -> dict[str, Any]:
    return variant(f"DEPTH -> {value}", [("DEPTH = 4", f"DEPTH = {value}")])


def make_request(k: int = 3, **kw: Any) -> ProposalRequest:
    fields: dict[str, Any] = {
        "campaign": CAMPAIGN,
        "parent_id": "p0",
        "parent_source": PARENT,
        "best_value": None,
        "results": [],
        "in_flight_titles": [],
        "known_ids": set(),
        "k": k,
        "wave": 1,
        "free_slots": {"default": k},
    }
    fields.update(kw)
    return ProposalRequest(**fields)


@contextlib.contextmanager
def scripted_server(monkeypatch: pytest.MonkeyPatch, home: Path) -> Iterator[FakeAnthropic]:
    """The fake Messages API with scripted answers only, and the client pointed at it."""
    with FakeAnthropic(auto=False) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-key-123")
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("NIGHTSHIFT_CLAUDE_TIMEOUT_S", "5")
        monkeypatch.setenv("NIGHTSHIFT_CLAUDE_MAX_RETRIES", "4")
        for var in (
            "NIGHTSHIFT_CLAUDE_PRICE",
            "NIGHTSHIFT_ANTHROPIC_KEY_FILE",
            "ANTHROPIC_AUTH_TOKEN",
        ):
            monkeypatch.delenv(var, raising=False)
        yield server


def campaign(**proposer: Any) -> CampaignStarted:
    return CampaignStarted(
        campaign=CAMPAIGN,
        seed_digest="d",
        harness_key="h",
        proposer=ProposerConfig(strategy="claude", **proposer),
    )


Make = Callable[..., ClaudeStrategy]


def strategy_maker() -> Make:
    """Builds claude strategies from the settings in the environment (and overrides)."""

    def build(settings: Settings | None = None, **proposer: Any) -> ClaudeStrategy:
        strategy = build_claude_strategy(settings or load_settings(), campaign(**proposer))
        assert strategy is not None
        return strategy

    return build
