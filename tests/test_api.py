"""The ledger's HTTP API on the real FastAPI app over a real SQLite ledger."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.contracts import RunStarted, run_id_for
from services.ledger.api import create_app
from services.ledger.db import open_db
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


@pytest.mark.parametrize(
    "url",
    [
        "/campaigns/nope",
        "/campaigns/nope/best",
        "/campaigns/nope/best/train.py",
        "/campaigns/nope/variants",
        "/campaigns/nope/results.tsv",
        "/campaigns/nope/deadletters",
        "/variants/nope",
        "/variants/nope/source",
        "/variants/nope/diff",
        "/variants/nope/lineage",
        "/runs/nope",
        "/runs/nope/log",
    ],
)
def test_unknown_ids_are_404(client: TestClient, url: str) -> None:
    response = client.get(url)
    assert response.status_code == 404
    assert "nope" in response.json()["detail"]


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
