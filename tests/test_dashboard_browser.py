"""The dashboard in headless Chromium over a real sim campaign (nats-server, the four
services, SQLite), driven with Selenium: no console errors, the chart's points and the
table's rows equal the API's, a new result appears without a reload, Stop from the page
(wrong token, then the right one), a title holding <script> shown as text, a variant page
with its diff and lineage. Screenshots go to $NIGHTSHIFT_SCREENSHOTS or a temporary
directory, printed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.contracts import VariantProposed, event_id_for, variant_id_for

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="the browser tests need headless Chromium: Debian's chromium and "
        "chromium-driver packages (/usr/bin/chromium, /usr/bin/chromedriver); "
        "`apt-get install chromium chromium-driver` (.ci/run installs them)",
    ),
    pytest.mark.slow,
]
pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra)")
from selenium.webdriver.common.by import By  # noqa: E402

from tests.browser_helpers import (  # noqa: E402
    SimCampaign,
    chromium,
    console_errors,
    guarded_ledger,
    points,
    read_feed,
    screenshot,
    wait,
)

TOKEN = "browser-test-token"
CAMPAIGN = "night"
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimCampaign]:
    campaign = SimCampaign(tmp_path_factory.mktemp("browser"), CAMPAIGN, TOKEN)
    try:
        yield campaign
    finally:
        campaign.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium(str(CHROMIUM), str(CHROMEDRIVER)) as driver:
        yield driver


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("NIGHTSHIFT_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {path}")
    return path


def test_overview_updates_live_without_a_reload(sim: SimCampaign, browser: Any) -> None:
    wait(browser, lambda: len(sim.get(f"/campaigns/{CAMPAIGN}/progress")["points"]) >= 4, "results")
    browser.get(f"{sim.url}/ui/campaigns/{CAMPAIGN}")
    browser.execute_script("window.__page = 'first load'")
    before = len(points(browser))
    assert before >= 4
    wait(browser, lambda: browser.find_element(By.ID, "live").text == "live", "the live feed")
    wait(browser, lambda: len(points(browser)) > before, "a new point without a reload")
    assert browser.execute_script("return window.__page") == "first load"
    assert console_errors(browser) == []


def test_stop_from_the_page_needs_the_right_token(sim: SimCampaign, browser: Any) -> None:
    # Enough points for a chart worth a screenshot (~8 results a second).
    wait(
        browser,
        lambda: len(sim.get(f"/campaigns/{CAMPAIGN}/progress")["points"]) >= 24,
        "24 results",
    )
    browser.get(f"{sim.url}/ui/campaigns/{CAMPAIGN}")
    message = browser.find_element(By.ID, "control-msg")
    token = browser.find_element(By.ID, "token")
    token.send_keys("wrong")
    browser.find_element(By.CSS_SELECTOR, "button[data-action=stop]").click()
    wait(browser, lambda: message.text.startswith("401"), "the refusal")
    assert "wrong bearer token" in message.text
    assert sim.get(f"/campaigns/{CAMPAIGN}")["status"] == "running"
    token.clear()
    token.send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "button[data-action=stop]").click()
    wait(browser, lambda: message.text.startswith("stopped"), "the stop")
    wait(browser, lambda: browser.find_element(By.ID, "state").text == "STOPPED", "the new state")
    errors = [e["message"] for e in console_errors(browser)]
    assert len(errors) == 1 and "/stop - Failed to load resource" in errors[0], errors  # the 401


def _settled(sim: SimCampaign) -> bool:
    """No run left running or requested, and the ledger caught up with the last result."""
    summary = sim.get(f"/campaigns/{CAMPAIGN}")
    runs = summary["counts"]["runs"]
    fleet = sim.get(f"/campaigns/{CAMPAIGN}/overview")["fleet"]
    idle = fleet["heard"] and not any(t["busy"] for t in fleet["tiers"])
    return (
        idle and not runs.get("running") and not runs.get("requested") and not runs.get("finished")
    )


def test_chart_and_table_equal_the_api(sim: SimCampaign, browser: Any, shots: Path) -> None:
    wait(browser, lambda: _settled(sim), "the stopped campaign to settle", timeout=20)
    browser.get(f"{sim.url}/ui/campaigns/{CAMPAIGN}")
    progress = sim.get(f"/campaigns/{CAMPAIGN}/progress")
    summary = sim.get(f"/campaigns/{CAMPAIGN}")
    assert points(browser) == [p["run_id"] for p in progress["points"]]
    values = browser.execute_script(
        "return Array.from(document.querySelectorAll('circle.point'), c => +c.dataset.value)"
    )
    assert values == [p["value"] for p in progress["points"]]
    assert len(points(browser)) == summary["counts"]["results"]["ok"]
    kept = browser.find_elements(By.CSS_SELECTOR, "circle.point.kept")
    assert len(kept) == sum(p["kept"] for p in progress["points"]) >= 1
    labels = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "text.kept-label")]
    titles = [p["title"] for p in progress["points"] if p["kept"]]
    assert labels == [t if len(t) <= 38 else t[:38] + "…" for t in titles]
    rows = browser.find_elements(By.CSS_SELECTOR, "table.experiments tbody tr[data-variant]")
    api = sim.get(f"/campaigns/{CAMPAIGN}/variants", sort="time", order="desc", limit=25)
    assert [r.get_attribute("data-variant") for r in rows] == [v["variant_id"] for v in api]
    total = browser.find_element(By.CSS_SELECTOR, "table.experiments").get_attribute("data-total")
    assert int(total) == summary["counts"]["proposed"]
    assert console_errors(browser) == []
    screenshot(browser, shots / "dashboard-overview.png")


def test_live_feed_resumes_from_last_event_id(sim: SimCampaign) -> None:
    everything = read_feed(sim, CAMPAIGN, **{"Last-Event-ID": "0"})
    results = [m for m in everything if m[1] == "result"]
    summary = sim.get(f"/campaigns/{CAMPAIGN}")
    assert len(results) == summary["counts"]["evaluated"]
    assert [m[0] for m in results] == sorted(m[0] for m in results)
    update = everything[-1]
    assert update[2]["position"] == update[0] >= results[-1][0]
    infra = summary["counts"]["results"].get("infra", 0)
    assert update[2]["evaluated"] == summary["counts"]["evaluated"] - infra
    resumed = read_feed(sim, CAMPAIGN, **{"Last-Event-ID": str(results[-3][0])})
    assert [m[2]["run_id"] for m in resumed[:-1]] == [m[2]["run_id"] for m in results[-2:]]
    assert resumed[-1][1] == "update"


def test_a_script_in_a_title_is_shown_as_text(sim: SimCampaign, browser: Any) -> None:
    best = sim.get(f"/campaigns/{CAMPAIGN}/best")
    source = best["source"] + "\n# a proposal with a hostile title\n"
    vid = variant_id_for(CAMPAIGN, source)

    async def propose() -> None:
        digest = await sim.bus.put_source(source)
        await sim.bus.publish(
            VariantProposed(
                campaign=CAMPAIGN,
                event_id=event_id_for("proposed", vid),
                variant_id=vid,
                parent_id=best["variant_id"],
                source_digest=digest,
                diff="",
                title=HOSTILE,
            )
        )

    sim.call(propose())
    wait(browser, lambda: sim.http.get(f"/variants/{vid}").status_code == 200, "the proposal")
    browser.get(f"{sim.url}/ui/campaigns/{CAMPAIGN}?q=script")
    cell = browser.find_element(By.CSS_SELECTOR, f"tr[data-variant='{vid}'] td.title")
    assert cell.text == HOSTILE
    browser.get(f"{sim.url}/ui/variants/{vid}")
    assert browser.find_element(By.ID, "variant-title").text == HOSTILE
    assert browser.execute_script("return window.__pwned") is None
    assert console_errors(browser) == []


def test_variant_page_shows_its_diff_and_lineage(
    sim: SimCampaign, browser: Any, shots: Path
) -> None:
    progress = sim.get(f"/campaigns/{CAMPAIGN}/progress")
    kept = [p["variant_id"] for p in progress["points"] if p["kept"]]
    chains = {vid: sim.get(f"/variants/{vid}/lineage") for vid in kept}
    vid = max(chains, key=lambda v: len(chains[v]))  # the longest chain back to the seed
    lineage = chains[vid]
    assert len(lineage) >= 2, "no kept variant descends from another one"
    browser.get(f"{sim.url}/ui/variants/{vid}")
    assert browser.find_elements(By.CSS_SELECTOR, "pre.diff span.add")
    assert browser.find_elements(By.CSS_SELECTOR, "pre.diff span.del")
    items = browser.find_elements(By.CSS_SELECTOR, "ol.lineage li")
    assert len(items) == len(lineage)
    assert [i.find_element(By.CSS_SELECTOR, ".mono").text for i in items] == [
        a["variant_id"] for a in lineage
    ]
    assert browser.find_elements(By.CSS_SELECTOR, "details.run")
    assert console_errors(browser) == []
    screenshot(browser, shots / "dashboard-variant.png")
    items[0].find_element(By.TAG_NAME, "a").click()
    wait(
        browser,
        lambda: browser.current_url.endswith(f"/ui/variants/{lineage[0]['variant_id']}"),
        "the root",
    )


def test_overview_fits_a_phone_in_dark_mode(sim: SimCampaign, browser: Any, shots: Path) -> None:
    dark = {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", dark)
    browser.set_window_size(390, 844)
    try:
        browser.get(f"{sim.url}/ui/campaigns/{CAMPAIGN}")
        width = browser.execute_script("return document.documentElement.clientWidth")
        assert width <= 400
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, "the page scrolls sideways on a phone"
        background = browser.execute_script(
            "return getComputedStyle(document.body).backgroundColor"
        )
        assert background == "rgb(18, 19, 22)"  # the dark palette
        assert console_errors(browser) == []
        browser.save_screenshot(str(shots / "dashboard-phone-dark.png"))
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        browser.set_window_size(1280, 900)


def test_a_ledger_closed_for_reads_asks_for_the_token(sim: SimCampaign, browser: Any) -> None:
    with guarded_ledger(sim.home / "ledger.db", TOKEN) as url:
        browser.get(f"{url}/ui/campaigns/{CAMPAIGN}")
        assert browser.find_elements(By.ID, "token-form")
        assert not browser.find_elements(By.CSS_SELECTOR, "circle.point")
        browser.find_element(By.ID, "read-token").send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
        wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "circle.point"), "the page")
        # The live feed (an EventSource, which sends no headers) gets in with the cookie.
        wait(browser, lambda: browser.find_element(By.ID, "live").text == "live", "the feed")
        errors = [e["message"] for e in console_errors(browser)]
        assert all("401" in e for e in errors), errors  # only the first, refused, load
        browser.get("about:blank")


def test_resume_from_the_page_brings_new_results(sim: SimCampaign, browser: Any) -> None:
    browser.get(f"{sim.url}/ui/campaigns/{CAMPAIGN}")
    browser.execute_script("window.__page = 'before resume'")
    before = len(points(browser))
    token = browser.find_element(By.ID, "token")
    assert token.get_attribute("value") == TOKEN  # the tab remembers it
    browser.find_element(By.CSS_SELECTOR, "button[data-action=resume]").click()
    message = browser.find_element(By.ID, "control-msg")
    wait(browser, lambda: message.text.startswith("resumed"), "the resume")
    wait(browser, lambda: browser.find_element(By.ID, "state").text == "RUNNING", "running again")
    wait(browser, lambda: len(points(browser)) > before, "new results after the resume")
    assert browser.execute_script("return window.__page") == "before resume"
    assert console_errors(browser) == []
