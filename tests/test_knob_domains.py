"""Knob domains (services.contracts.knobs): the grid never proposes a value outside them, the
sim landscape's optimum lies inside them, and the sim crashes a run that breaks them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.bench_search import Campaign, GridSearcher, knob_head, run_campaign
from services.contracts.knobs import SEQ_LEN_BY_PROFILE, domain_of, invalid_reason, live_knobs
from services.launcher import landscape as ls
from services.proposer.strategy import Proposal, ProposalRequest

REPO = Path(__file__).resolve().parents[1]
TRAIN = knob_head((REPO / "trainer" / "train.py").read_text())

# The troublemakers: a beta whose x2 step on (1 - beta) went below zero, ratios at
# both ends of [0, 1], a batch pair whose halving breaks the whole-number-of-rows rule.
EDGES = """ADAM_BETA1 = 0.44
ADAM_BETA2 = 0.995
WARMUP_RATIO = 0.0
WARMDOWN_RATIO = 0.9
FINAL_LR_FRAC = 1.0
MATRIX_LR = 0.04
CPU_DEPTH = 3
CPU_HEAD_DIM = 32
CPU_TOTAL_BATCH_SIZE = 2048
CPU_DEVICE_BATCH_SIZE = 8
DEPTH = 8
"""


class Recording(GridSearcher):
    def __init__(self, profile: str) -> None:
        super().__init__(profile)
        self.proposed: list[Proposal] = []

    def plan(self, request: ProposalRequest) -> list[Proposal]:
        planned = super().plan(request)
        self.proposed += planned
        return planned


def test_domains_follow_name_and_reference_value() -> None:
    kinds = {
        name: domain_of(name, value).kind
        for name, value in {
            "ADAM_BETA1": 0.8,
            "WARMUP_RATIO": 0.0,
            "ASPECT_RATIO": 64,
            "CPU_TOTAL_BATCH_SIZE": 2048,
            "CPU_DEPTH": 3,
            "MATRIX_LR": 0.04,
            "BIAS": -1.0,
        }.items()
    }
    assert kinds == {
        "ADAM_BETA1": "beta",
        "WARMUP_RATIO": "ratio",
        "ASPECT_RATIO": "int",  # a ratio of sizes, not a fraction
        "CPU_TOTAL_BATCH_SIZE": "pow2",
        "CPU_DEPTH": "int",
        "MATRIX_LR": "positive",
        "BIAS": "real",
    }
    beta = domain_of("ADAM_BETA1", 0.44)
    assert not beta.contains(-0.12) and not beta.contains(1.0) and beta.contains(0.216)
    pair = {"CPU_TOTAL_BATCH_SIZE": 1024, "CPU_DEVICE_BATCH_SIZE": 8}
    domains = {name: domain_of(name, 8) for name in pair}
    reason = invalid_reason(pair, domains, "cpu")
    assert reason is not None and "CPU_TOTAL_BATCH_SIZE" in reason and "256" in reason
    assert invalid_reason({**pair, "CPU_TOTAL_BATCH_SIZE": 4096}, domains, "cpu") is None


def test_sequence_lengths_agree_with_prepare() -> None:
    text = (REPO / "trainer" / "prepare.py").read_text()
    found = re.findall(r'"(\w+)": \{"max_seq_len": (\d+)', text)
    assert {name: int(n) for name, n in found} == SEQ_LEN_BY_PROFILE


@pytest.mark.parametrize(("reference", "profile"), [(TRAIN, "cpu"), (TRAIN, "gpu"), (EDGES, "cpu")])
def test_the_grid_never_proposes_a_value_outside_the_domains(reference: str, profile: str) -> None:
    for sim_seed in range(3):
        scape = ls.Landscape(reference, seed=sim_seed, profile=profile)
        grid = Recording(profile)
        camp = Campaign(scape, reference, 16, 96, 7e-4, 0.5, sim_seed)
        run_campaign(camp, grid, lookahead=4)
        assert len(grid.proposed) >= 90
        for proposal in grid.proposed:
            assert scape.invalid_reason(proposal.source) is None, (sim_seed, proposal.title)
        crashed = [r for r in camp.rows if r.status == "crash"]
        assert not crashed, crashed[:3]


def test_the_landscape_scores_only_the_profiles_live_knobs() -> None:
    cpu = ls.Landscape(TRAIN, seed=1, profile="cpu")
    assert "CPU_DEPTH" in cpu.reference and "DEPTH" not in cpu.reference
    gpu = ls.Landscape(TRAIN, seed=1, profile="gpu")
    assert "DEPTH" in gpu.reference and "CPU_DEPTH" not in gpu.reference
    assert live_knobs(["DEPTH", "CPU_DEPTH", "MATRIX_LR"], "cpu") == ["CPU_DEPTH", "MATRIX_LR"]
    # A knob the profile overrides moves nothing on that profile.
    moved = ls.set_constants(TRAIN, {"DEPTH": 16})
    assert cpu.true_val_bpb(moved) == cpu.true_val_bpb(TRAIN)
    assert gpu.true_val_bpb(moved) != gpu.true_val_bpb(TRAIN)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_the_landscape_optimum_lies_inside_the_domains(profile: str) -> None:
    for sim_seed in range(12):
        scape = ls.Landscape(TRAIN, seed=sim_seed, profile=profile)
        for axis in scape.axes:
            if axis.domain.is_int:
                assert axis.optimum >= 1, (sim_seed, axis.name, axis.optimum)
            else:
                assert axis.domain.contains(axis.optimum), (sim_seed, axis.name, axis.optimum)
        reachable = scape.reachable_values()
        source = ls.set_constants(TRAIN, reachable)
        assert scape.invalid_reason(source) is None
        value = scape.true_val_bpb(source)
        assert value == pytest.approx(scape.reachable_val_bpb(), abs=1e-9)
        # Only rounding integers (and the batch rule) stand between it and the optimum.
        assert ls.OPTIMUM_BPB <= value < ls.OPTIMUM_BPB + 0.015, (sim_seed, value)


def test_the_sim_crashes_a_run_that_breaks_the_trainers_rules() -> None:
    scape = ls.Landscape(TRAIN, seed=0, profile="cpu")
    for values in ({"CPU_TOTAL_BATCH_SIZE": 1024}, {"ADAM_BETA1": -0.12}, {"WARMUP_RATIO": 1.5}):
        obs = scape.observe(ls.set_constants(TRAIN, values), "k", 7e-4, 0.0)
        assert obs.failure == "crash" and obs.val_bpb is None
        assert "AssertionError" in obs.detail and next(iter(values)) in obs.detail
    # The gpu knobs the cpu profile overrides are not its to check.
    fine = scape.observe(ls.set_constants(TRAIN, {"TOTAL_BATCH_SIZE": 3}), "k", 7e-4, 0.0)
    assert fine.failure == ""
