"""Validation every variant passes before it is published, whoever proposed it."""

from __future__ import annotations

import pytest

from services.contracts import knob_values_only, variant_id_for
from services.proposer.validate import Edit, apply_edits, validate_source
from tests.e2e_helpers import SEED

PARENT = SEED.read_text()


def check(source: str, known: set[str] | None = None) -> list[str]:
    return validate_source(source, campaign="c", known_ids=known or set(), parent_source=PARENT)


def test_the_seed_and_a_constant_change_are_fine() -> None:
    assert validate_source(PARENT, campaign="c", known_ids=set()) == []
    assert check(PARENT.replace("SEED = 42", "SEED = 43", 1)) == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("SEED = 42\nprint('val_bpb: 0.5')", "writes a literal result for 'val_bpb'"),
        ("SEED = 42\nprint(f'val_bpb: {SEED}')", "prints summary keys in 5 places"),
        ("SEED = 42\ndata = open('/etc/passwd').read()", "outside its run directory"),
        ("SEED = 42\ndata = open('../prepare.py').read()", "outside its run directory"),
        ("SEED = 42\ndef evaluate_bpb(*a):\n    return 0.1", "redefines the harness function"),
        ("SEED = 42\nevaluate_bpb = lambda *a: 0.1", "rebinds the harness name"),
        ("SEED = (42", "does not compile"),
    ],
)
def test_harness_violations_are_rejected_with_a_reason(change: str, reason: str) -> None:
    reasons = check(PARENT.replace("SEED = 42", change, 1))
    assert any(reason in r for r in reasons), reasons


def test_duplicates_and_oversize_sources_are_rejected() -> None:
    variant = PARENT.replace("SEED = 42", "SEED = 7", 1)
    assert check(variant, {variant_id_for("c", variant)}) == [
        "duplicate of a variant already proposed in this campaign"
    ]
    assert "over the" in validate_source("x = 1\n" * 50_000, campaign="c", known_ids=set())[0]


def test_edits_apply_exactly_once() -> None:
    assert apply_edits("a = 1\nb = 2\n", [Edit("b = 2", "b = 3")]) == ("a = 1\nb = 3\n", [])
    source, reasons = apply_edits("a = 1\nb = 1\n", [Edit("= 1", "= 2"), Edit("zzz", "y")])
    assert source is None
    assert "found 2 times" in reasons[0] and "not found" in reasons[1]


def test_knob_value_changes_take_the_fast_path_and_nothing_else_does() -> None:
    assert knob_values_only(PARENT.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.08"), PARENT)
    assert knob_values_only(PARENT.replace("SEED = 42", "SEED = 2**4"), PARENT)
    for changed in (
        "MATRIX_LR = open('/x')",
        "OTHER_LR = 0.04",
        "MATRIX_LR = 0.04; import os",
        "MATRIX_LR = 0.04\nX = 1",
    ):
        assert not knob_values_only(PARENT.replace("MATRIX_LR = 0.04", changed), PARENT)
    assert not knob_values_only(PARENT, PARENT)
    faster = PARENT.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.08")
    assert check(faster) == []
    assert check(faster, {variant_id_for("c", faster)}) == [
        "duplicate of a variant already proposed in this campaign"
    ]
