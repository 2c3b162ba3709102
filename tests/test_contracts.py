"""Contracts: round trips, typed errors, deterministic identity."""

from __future__ import annotations

import typing

import msgspec
import pytest

from services import contracts
from services.contracts import (
    EVENT_TYPES,
    ContractError,
    ResultEvaluated,
    RunProgress,
    VariantProposed,
    decode,
    encode,
    run_id_for,
    variant_id_for,
)


def test_every_event_round_trips_and_names_its_subject() -> None:
    event = ResultEvaluated(
        campaign="c",
        event_id="e",
        run_id="r",
        variant_id="v",
        tier="default",
        status="ok",
        value=0.99,
        metrics={"val_bpb": 0.99},
    )
    assert decode(encode(event)) == event
    assert event.subject() == "ns.result.evaluated"
    assert event.subject("lab") == "lab.result.evaluated"
    progress = RunProgress(
        campaign="c",
        run_id="r1",
        variant_id="v",
        step=3,
        fraction=0.1,
        train_loss=3.0,
        tok_per_s=1e4,
    )
    assert progress.subject() == "ns.run.progress.r1"
    stored = contracts.stream_subjects()
    assert "ns.run.progress" not in stored and "ns.fleet.status" not in stored
    assert len({cls.tag() for cls in EVENT_TYPES}) == len(EVENT_TYPES)
    assert RunProgress.subject_filter() == "ns.run.progress.>"


def test_event_types_are_the_union_and_subjects_are_their_tags() -> None:
    """Defined once: EVENT_TYPES is AnyEvent's members; a subject is prefix + tag."""
    assert set(EVENT_TYPES) == set(typing.get_args(contracts.AnyEvent))
    for cls in EVENT_TYPES:
        assert cls.subject_filter("p").startswith(f"p.{cls.tag()}")
        assert cls.tag() == cls.__struct_config__.tag


def test_trainer_contract_round_trips() -> None:
    """The summary block the sim writes is the one the evaluator parses; markers likewise."""
    lines = contracts.format_summary({"val_bpb": "0.997900", "num_steps": "953"})
    assert lines[1] == "val_bpb:          0.997900"
    assert contracts.parse_summary("noise\n" + "\n".join(lines)) == {
        "val_bpb": 0.9979,
        "num_steps": 953.0,
    }
    log = "step 1\n" + contracts.cancelled_line("campaign stopped") + "\n"
    assert contracts.cancel_reason(log) == "campaign stopped"
    assert contracts.cancel_reason("no marker\n") is None
    progress = contracts.parse_progress(
        "step 00953 (100.0%) | loss: 3.120000 | lrm: 1.00 | dt: 3ms | tok/sec: 1,668,123 | x"
    )
    assert progress is not None and (progress.step, progress.tok_per_s) == (953, 1668123.0)
    assert contracts.SUMMARY_KEYS[:4] == contracts.MEASURED_KEYS


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"{}",
        b'{"type": "nope"}',
        b'{"type": "variant.proposed", "campaign": "c"}',
    ],
)
def test_malformed_messages_raise_one_typed_error(payload: bytes) -> None:
    with pytest.raises(ContractError):
        decode(payload)


def test_unknown_schema_version_is_refused() -> None:
    event = VariantProposed(
        campaign="c", variant_id="v", parent_id=None, source_digest="d", diff="", title="t"
    )
    raw = msgspec.json.decode(encode(event))
    raw["schema"] = contracts.SCHEMA_VERSION + 1
    with pytest.raises(ContractError, match="schema version"):
        decode(msgspec.json.encode(raw))


def test_identity_is_content_addressed_and_campaign_scoped() -> None:
    a = variant_id_for("c", "X = 1\r\nprint(X)   \n\n")
    assert a == variant_id_for("c", "X = 1\nprint(X)\n")
    assert len(a) == 16
    assert a != variant_id_for("other", "X = 1\nprint(X)\n")
    assert a != variant_id_for("c", "X = 2\nprint(X)\n")
    assert run_id_for(a, "h100", 2) == f"{a}-h100-2"
