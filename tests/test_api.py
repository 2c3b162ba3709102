"""The ledger's HTTP API on the real FastAPI app over a real SQLite ledger."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.contracts import ResultEvaluated, RunStarted, VariantProposed, run_id_for
from services.ledger import queries
from services.ledger.api import create_app
from services.ledger.db import open_db, open_read
from services.ledger.projection import apply_event
from tests.synthetic import synthetic_campaign


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    path = tmp_path_factory.mktemp("api") / "ledger.db"
    conn = open_db(path)
    for event, source, log in synthetic_campaign("demo", variants=10, seed=2):
        apply_event(conn, event, source_text=source, log_text=log)
    conn.close()
    with TestClient(create_app(path)) as test_client:
        yield test_client


def _variants(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    response = client.get("/campaigns/demo/variants", params=params)
    assert response.status_code == 200, response.text
    body: list[dict[str, Any]] = response.json()
    return body


def test_healthz_and_campaigns(client: TestClient) -> None:
    health = client.get("/healthz").json()
    assert health["ok"] is True and health["events"] > 30
    campaigns = client.get("/campaigns").json()
    assert [c["name"] for c in campaigns] == ["demo"]
    summary = client.get("/campaigns/demo").json()
    assert summary["status"] == "completed"
    assert summary["counts"]["proposed"] == 10
    assert summary["best"]["variant_id"] == campaigns[0]["best_variant_id"]
    assert summary["config"]["metric"] == "val_bpb"


def test_best_and_its_source(client: TestClient) -> None:
    best = client.get("/campaigns/demo/best").json()
    ok_values = [v["value"] for v in _variants(client, limit=1000) if v["value"] is not None]
    assert best["value"] == min(ok_values)
    response = client.get("/campaigns/demo/best/train.py")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'filename="train.py"' in response.headers["content-disposition"]
    assert response.text == best["source"]


def test_variants_query_params(client: TestClient) -> None:
    rows = _variants(client, sort="val_bpb", order="desc", limit=1000)
    values = [v["value"] for v in rows if v["value"] is not None]
    assert values == sorted(values, reverse=True)
    assert [v["status"] for v in _variants(client, status="crash")] == ["crash", "crash"]
    page1 = _variants(client, sort="time", limit=4)
    page2 = _variants(client, sort="time", limit=4, offset=4)
    assert len(page1) == 4 and not {v["variant_id"] for v in page1} & {
        v["variant_id"] for v in page2
    }
    for params in (
        {"limit": 0},
        {"limit": 1001},
        {"offset": -1},
        {"sort": "bogus"},
        {"order": "up"},
        {"status": "nope"},
    ):
        assert client.get("/campaigns/demo/variants", params=params).status_code == 422, params


def test_variant_endpoints(client: TestClient) -> None:
    rows = _variants(client, sort="time", limit=3)
    baseline, child = rows[0], rows[2]
    found = client.get(f"/variants/{child['variant_id']}").json()
    assert found["title"] == child["title"] and found["runs"][0]["status"] in ("ok", "crash")
    source = client.get(f"/variants/{child['variant_id']}/source")
    assert source.status_code == 200 and "LR = 0.042" in source.text
    diff = client.get(f"/variants/{child['variant_id']}/diff")
    assert diff.headers["content-type"].startswith("text/x-diff")
    assert "+LR = 0.042" in diff.text
    lineage = client.get(f"/variants/{child['variant_id']}/lineage").json()
    assert [v["variant_id"] for v in lineage] == [baseline["variant_id"], child["variant_id"]]


def test_run_endpoints(client: TestClient) -> None:
    variant = _variants(client, sort="time", limit=1)[0]
    run_id = run_id_for(variant["variant_id"], "default", 0)
    run = client.get(f"/runs/{run_id}").json()
    assert run["state"] == "evaluated" and run["status"] == "ok" and run["backend"] == "sim"
    assert run["metrics"]["peak_vram_mb"] == 2048.0
    log = client.get(f"/runs/{run_id}/log")
    assert log.status_code == 200 and "val_bpb:" in log.text


def test_results_tsv_matches_variants(client: TestClient) -> None:
    response = client.get("/campaigns/demo/results.tsv")
    assert response.headers["content-type"].startswith("text/tab-separated-values")
    lines = response.text.splitlines()
    assert lines[0].split("\t") == ["commit", "val_bpb", "memory_gb", "status", "description"]
    by_id = {v["variant_id"]: v for v in _variants(client, limit=1000)}
    assert {line.split("\t")[0] for line in lines[1:]} == set(by_id)
    for line in lines[1:]:
        commit, value, _, status, _ = line.split("\t")
        assert status == by_id[commit]["status"]
        if status != "crash":
            assert value == f"{by_id[commit]['value']:.6f}"


def test_deadletters_and_history(client: TestClient) -> None:
    assert client.get("/campaigns/demo/deadletters").json() == []
    history = client.get("/campaigns/demo/history").json()
    assert history[-1]["variant_id"] == client.get("/campaigns/demo/best").json()["variant_id"]


UNKNOWN_VARIANT = "0123456789abcdef"  # well formed, not in the ledger
UNKNOWN_RUN = f"{UNKNOWN_VARIANT}-default-0"


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("/campaigns/nope", "nope"),
        ("/campaigns/nope/best", "nope"),
        ("/campaigns/nope/best/train.py", "nope"),
        ("/campaigns/nope/variants", "nope"),
        ("/campaigns/nope/results.tsv", "nope"),
        ("/campaigns/nope/deadletters", "nope"),
        ("/campaigns/nope/history", "nope"),
        (f"/variants/{UNKNOWN_VARIANT}", UNKNOWN_VARIANT),
        (f"/variants/{UNKNOWN_VARIANT}/source", UNKNOWN_VARIANT),
        (f"/variants/{UNKNOWN_VARIANT}/diff", UNKNOWN_VARIANT),
        (f"/variants/{UNKNOWN_VARIANT}/lineage", UNKNOWN_VARIANT),
        (f"/runs/{UNKNOWN_RUN}", UNKNOWN_RUN),
        (f"/runs/{UNKNOWN_RUN}/log", UNKNOWN_RUN),
    ],
)
def test_unknown_ids_are_404(client: TestClient, url: str, named: str) -> None:
    response = client.get(url)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert named in response.json()["detail"]


@pytest.mark.parametrize(
    ("url", "params"),
    [
        ("/campaigns/demo/variants", {"offset": "1" * 31}),  # was a 500: SQLite overflow
        ("/campaigns/demo/variants", {"offset": 10**9 + 1}),
        ("/campaigns/demo/variants", {"limit": "9" * 20}),
        ("/campaigns/has space", {}),
        ("/campaigns/" + "a" * 129, {}),
        ("/variants/nope", {}),
        ("/variants/0123456789ABCDEF/diff", {}),
        ("/variants/0123456789abcdef0", {}),
        ("/runs/nope", {}),
        ("/runs/0123456789abcdef-default-x/log", {}),
    ],
)
def test_out_of_bounds_parameters_are_422(
    client: TestClient, url: str, params: dict[str, Any]
) -> None:
    response = client.get(url, params=params)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][0] in ("path", "query")


def test_json_answers_keep_the_shapes_of_the_queries(client: TestClient) -> None:
    """The response models drop nothing the queries return (a field added to a query
    must be declared in services/ledger/models.py too)."""
    conn = open_read(client.app.state.db_path)  # type: ignore[attr-defined]
    try:
        variant_id = queries.list_variants(conn, "demo", sort="time", limit=3)[2]["variant_id"]
        run_id = run_id_for(variant_id, "default", 0)
        expected = {
            "/campaigns": queries.list_campaigns(conn),
            "/campaigns/demo": queries.campaign_summary(conn, "demo"),
            "/campaigns/demo/best": queries.best(conn, "demo"),
            "/campaigns/demo/variants?limit=1000": queries.list_variants(conn, "demo", limit=1000),
            "/campaigns/demo/deadletters": queries.dead_letters(conn, "demo"),
            "/campaigns/demo/history": queries.best_history(conn, "demo"),
            f"/variants/{variant_id}": queries.variant(conn, variant_id),
            f"/variants/{variant_id}/lineage": queries.lineage(conn, variant_id),
            f"/runs/{run_id}": queries.run(conn, run_id),
        }
    finally:
        conn.close()
    for url, value in expected.items():
        assert client.get(url).json() == value, url


def test_dashboard(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<svg" in page and 'data-campaign="demo"' in page  # the live overview
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_no_best_yet_and_unfinished_run(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    conn = open_db(path)
    items = synthetic_campaign("fresh", variants=1, stop=False)[:3]  # started, proposed, run
    for event, source, text in items:
        apply_event(conn, event, source_text=source, log_text=text)
    assert isinstance(items[2][0], RunStarted)
    with TestClient(create_app(path)) as test_client:
        best = test_client.get("/campaigns/fresh/best")
        assert best.status_code == 404 and "no best" in best.json()["detail"]
        log = test_client.get(f"/runs/{items[2][0].run_id}/log")
        assert log.status_code == 404 and "no log yet" in log.json()["detail"]
        assert "no ok results yet" in test_client.get("/").text


def test_missing_ledger_is_503(tmp_path: Path) -> None:
    with TestClient(create_app(tmp_path / "absent.db")) as test_client:
        response = test_client.get("/campaigns")
        assert response.status_code == 503 and "no ledger" in response.json()["detail"]


def test_lineage_stops_at_a_missing_ancestor(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    conn = open_db(path)
    items = synthetic_campaign("orphan", variants=2, stop=False)
    for event, source, text in [items[0], *items[5:]]:  # without the baseline and its run
        apply_event(conn, event, source_text=source, log_text=text)
    child, result = items[5][0], items[8][0]
    assert isinstance(child, VariantProposed) and child.parent_id is not None
    assert isinstance(result, ResultEvaluated) and result.value is not None
    with TestClient(create_app(path)) as test_client:
        response = test_client.get(f"/variants/{child.variant_id}/lineage")
        assert response.status_code == 200, response.text
        assert response.json() == [
            {"variant_id": child.parent_id, "missing": True},
            {
                "variant_id": child.variant_id,
                "parent_id": child.parent_id,
                "title": child.title,
                "status": "keep",
                "value": result.value,
                "proposed_at": child.ts,
            },
        ]
