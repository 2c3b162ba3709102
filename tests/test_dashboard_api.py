"""The dashboard's endpoints on the real FastAPI app over a real SQLite ledger: the pages,
their data, the live feed's messages, the token guard of the controls and of reads (the
controls over a real nats-server), and the OpenAPI document."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
from fastapi.testclient import TestClient

from services.bus import Bus
from services.contracts import VariantProposed, event_id_for, source_digest, variant_id_for
from services.launcher.backend import is_secret_name
from services.ledger.api import create_app
from services.ledger.db import open_db
from services.ledger.live import changes
from services.ledger.overview import position
from services.ledger.projection import apply_event
from services.settings import Settings
from tests.synthetic import SEED_SOURCE, synthetic_campaign

TOKEN = "s3cret-token"
HOSTILE = "<script>window.__pwned = 1</script> & <b>bold</b>"


def _hostile_variant(name: str) -> VariantProposed:
    source = SEED_SOURCE + "# hostile\n"
    vid = variant_id_for(name, source)
    return VariantProposed(
        campaign=name,
        event_id=event_id_for("proposed", vid),
        ts=1_700_000_500.0,
        variant_id=vid,
        parent_id=variant_id_for(name, SEED_SOURCE),
        source_digest=source_digest(source),
        diff="",
        title=HOSTILE,
    )


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dash") / "ledger.db"
    conn = open_db(path)
    for event, source, log in synthetic_campaign("demo", variants=12, seed=3):
        apply_event(conn, event, source_text=source, log_text=log)
    hostile = _hostile_variant("demo")
    apply_event(conn, hostile, source_text=SEED_SOURCE + "# hostile\n")
    conn.close()
    return path


@pytest.fixture(scope="module")
def client(ledger: Path) -> Iterator[TestClient]:
    with TestClient(create_app(ledger)) as test_client:
        yield test_client


def test_pages_render_and_escape_titles(client: TestClient) -> None:
    home = client.get("/", follow_redirects=False)
    assert home.status_code == 307 and home.headers["location"] == "/ui/campaigns/demo"
    page = client.get("/ui/campaigns/demo")
    assert page.status_code == 200, page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert HOSTILE not in page.text and "&lt;script&gt;window.__pwned" in page.text
    assert 'class="best"' in page.text and "val_bpb (lower is better)" in page.text
    for part in ("stats", "chart", "table", "recent"):
        assert client.get(f"/ui/campaigns/demo/parts/{part}").status_code == 200, part
    assert client.get("/ui/campaigns/demo/parts/bogus").status_code == 422
    assert client.get("/ui/campaigns/nope").status_code == 404
    assert client.get("/static/dashboard.js").status_code == 200


def test_variant_page_shows_diff_and_lineage(client: TestClient) -> None:
    rows = client.get("/campaigns/demo/variants", params={"sort": "time", "limit": 3}).json()
    child = rows[2]
    page = client.get(f"/ui/variants/{child['variant_id']}")
    assert page.status_code == 200
    assert '<span class="add">+LR = 0.042</span>' in page.text
    assert '<span class="del">-LR = 0.04</span>' in page.text
    assert f'href="/ui/variants/{rows[0]["variant_id"]}"' in page.text  # the lineage's root
    assert client.get("/ui/variants/0123456789abcdef").status_code == 404
    assert client.get("/ui/variants/nope").status_code == 422  # not an id: refused before SQL


def test_progress_matches_the_results(client: TestClient) -> None:
    progress = client.get("/campaigns/demo/progress").json()
    summary = client.get("/campaigns/demo").json()
    assert len(progress["points"]) == summary["counts"]["results"]["ok"]
    assert progress["experiments"] == summary["counts"]["evaluated"]
    history = client.get("/campaigns/demo/history").json()
    assert [s["variant_id"] for s in progress["best"]] == [h["variant_id"] for h in history]
    assert {p["variant_id"] for p in progress["points"] if p["kept"]} == {
        h["variant_id"] for h in history
    }
    page = client.get("/ui/campaigns/demo/parts/chart").text
    assert page.count('<circle class="point') == len(progress["points"])


def test_experiments_filter_sort_and_pages(client: TestClient) -> None:
    def get(**params: object) -> dict[str, object]:
        response = client.get("/campaigns/demo/experiments", params=params)
        assert response.status_code == 200, response.text
        body: dict[str, object] = response.json()
        return body

    every = get(per_page=200)
    assert every["total"] == 13
    variants = client.get("/campaigns/demo/variants", params={"sort": "time", "order": "desc"})
    assert [r["variant_id"] for r in every["rows"]] == [  # type: ignore[attr-defined]
        v["variant_id"] for v in variants.json()
    ]
    by_value = get(sort="value", order="asc", per_page=200)["rows"]
    values = [r["value"] for r in by_value if r["value"] is not None]  # type: ignore[attr-defined]
    assert values == sorted(values)
    assert by_value[0]["delta"] == 0.0  # type: ignore[index]
    crashes = get(status="crash")
    assert crashes["total"] == 2
    assert get(q="script>")["total"] == 1
    assert get(q="%")["total"] == 0  # a LIKE wildcard is taken literally
    first, second = get(per_page=5), get(per_page=5, page=2)
    assert first["pages"] == 3
    ids = {r["variant_id"] for r in first["rows"]}  # type: ignore[attr-defined]
    assert not ids & {r["variant_id"] for r in second["rows"]}  # type: ignore[attr-defined]
    for bad in ({"page": 0}, {"per_page": 201}, {"sort": "x"}, {"status": "nope"}):
        assert client.get("/campaigns/demo/experiments", params=bad).status_code == 422
    assert client.get("/campaigns/nope/experiments").status_code == 404


def test_live_feed_replays_after_a_position(ledger: Path) -> None:
    conn = open_db(ledger)
    try:
        now = position(conn, "demo")
        seqs = [r[0] for r in conn.execute("SELECT seq FROM results ORDER BY seq")]
    finally:
        conn.close()
    assert changes(ledger, "demo", now, None) == (now, [])
    at, fresh = changes(ledger, "demo", None, None)
    assert at == now and len(fresh) == 1 and fresh[0].startswith(f"id: {now}\nevent: update\n")
    at, replay = changes(ledger, "demo", seqs[-3] - 1, None)
    assert at == now
    assert [m.split("\n")[0] for m in replay] == [f"id: {s}" for s in seqs[-3:]] + [f"id: {now}"]
    assert changes(ledger, "demo", now + 100, None) == (now, fresh)  # a rebuilt ledger
    update = json.loads(replay[-1].split("data: ", 1)[1])
    assert update["position"] == now and update["status"] == "completed"


def test_live_feed_endpoint_answers_404_for_an_unknown_campaign(client: TestClient) -> None:
    assert client.get("/campaigns/nope/events").status_code == 404


def test_openapi_declares_a_schema_for_each_new_json_response(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path, method in (
        ("/campaigns/{name}/progress", "get"),
        ("/campaigns/{name}/overview", "get"),
        ("/campaigns/{name}/experiments", "get"),
        ("/campaigns/{name}/stop", "post"),
        ("/campaigns/{name}/resume", "post"),
    ):
        schema = paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        assert "$ref" in schema, (path, schema)
    events = paths["/campaigns/{name}/events"]["get"]["responses"]["200"]["content"]
    assert "text/event-stream" in events
    assert not any(p.startswith("/ui/") for p in paths)


# --- the token guard ------------------------------------------------------------------


def _app_client(ledger: Path, bus: Bus | None = None, **settings: object) -> httpx.AsyncClient:
    app = create_app(ledger, Settings(**settings), bus)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ledger")


async def test_controls_are_off_without_a_token_setting(ledger: Path) -> None:
    async with _app_client(ledger) as http:
        response = await http.post("/campaigns/demo/stop", headers={"Authorization": "Bearer x"})
    assert response.status_code == 403
    assert "NIGHTSHIFT_API_TOKEN" in response.json()["detail"]


async def test_controls_need_the_right_token(ledger: Path, bus: Bus) -> None:
    for event, _, _ in synthetic_campaign("demo", variants=1)[:1]:
        await bus.campaigns.save(event)  # type: ignore[arg-type]
    async with _app_client(ledger, bus, api_token=TOKEN) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = await http.post("/campaigns/demo/stop", headers=headers)
            assert response.status_code == 401, (headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert not await bus.campaigns.is_stopped("demo")
        right = {"Authorization": f"Bearer {TOKEN}"}
        stopped = await http.post("/campaigns/demo/stop", headers=right)
        assert stopped.status_code == 200, stopped.text
        assert stopped.json() == {
            "campaign": "demo",
            "action": "stop",
            "changed": True,
            "detail": "stopped: no new proposals, runs cancelled",
        }
        assert await bus.campaigns.is_stopped("demo")
        again = await http.post("/campaigns/demo/stop", headers=right)
        assert again.json()["changed"] is False
        assert (await http.post("/campaigns/demo/resume", headers={})).status_code == 401
        assert await bus.campaigns.is_stopped("demo")
        resumed = await http.post("/campaigns/demo/resume", headers=right)
        assert resumed.status_code == 200 and resumed.json()["changed"] is True
        assert not await bus.campaigns.is_stopped("demo")
        restarted = await bus.campaigns.load("demo")
        assert restarted is not None and restarted.event_id.startswith(
            event_id_for("restarted", "demo", restarted.ts)[:8]
        )
        unknown = await http.post("/campaigns/nope/stop", headers=right)
        assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]


async def test_controls_without_a_broker_say_so(ledger: Path) -> None:
    async with _app_client(ledger, api_token=TOKEN) as http:
        response = await http.post(
            "/campaigns/demo/stop", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    assert response.status_code == 503 and "nightshift campaign stop" in response.text


async def test_reads_stay_open_unless_the_setting_closes_them(ledger: Path) -> None:
    async with _app_client(ledger, api_token=TOKEN) as http:
        assert (await http.get("/campaigns")).status_code == 200
        assert (await http.get("/ui/campaigns/demo")).status_code == 200
    async with _app_client(ledger, api_token=TOKEN, api_token_reads=True) as http:
        refused = await http.get("/campaigns")
        assert refused.status_code == 401 and "api_token" in refused.json()["detail"]
        wrong = await http.get("/campaigns", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "wrong token" in wrong.json()["detail"]
        ok = await http.get("/campaigns", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()[0]["name"] == "demo"
        http.cookies.set("nightshift_token", TOKEN)
        assert (await http.get("/campaigns/demo/progress")).status_code == 200
        http.cookies.clear()
        page = await http.get("/ui/campaigns/demo", headers={"Accept": "text/html"})
        assert page.status_code == 401 and 'id="token-form"' in page.text
        assert (await http.get("/campaigns/demo/events")).status_code == 401
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/static/dashboard.css")).status_code == 200


def test_reads_closed_without_a_token_is_refused_at_start(ledger: Path) -> None:
    with pytest.raises(ValueError, match="api_token_reads is set but api_token is empty"):
        create_app(ledger, Settings(api_token_reads=True))


def test_the_token_is_a_secret_setting() -> None:
    settings = Settings(api_token=TOKEN)
    assert TOKEN not in repr(settings) and TOKEN not in json.dumps(settings.redacted())
    assert msgspec.structs.asdict(settings)["api_token"] == TOKEN
    assert is_secret_name("NIGHTSHIFT_API_TOKEN")  # never in a trainer's environment


def test_pages_of_an_empty_ledger_and_of_a_campaign_without_results(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    open_db(path).close()
    with TestClient(create_app(path)) as http:
        empty = http.get("/")
        assert empty.status_code == 200 and "No campaign yet" in empty.text
    conn = open_db(path)
    for event, source, log in synthetic_campaign("fresh", variants=1, stop=False)[:3]:
        apply_event(conn, event, source_text=source, log_text=log)  # started, proposed, run
    conn.close()
    with TestClient(create_app(path)) as http:
        page = http.get("/ui/campaigns/fresh")
        assert page.status_code == 200 and "no ok results yet" in page.text
        assert http.get("/campaigns/fresh/progress").json()["points"] == []
        overview = http.get("/campaigns/fresh/overview").json()
        assert overview["status"] == "running" and overview["fleet"]["running_runs"] == 1
