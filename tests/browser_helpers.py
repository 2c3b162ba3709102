"""What the browser tests drive: a sim campaign served from a thread, headless Chromium,
and small readers of the page and of the live feed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from services.broker import EmbeddedNats
from services.bus import Bus
from services.campaign import start_campaign
from services.ledger.api import create_app
from services.settings import Settings
from services.supervisor import wait_for_ledger_url
from tests.e2e_helpers import services_running, sim_settings

T = TypeVar("T")


class SimCampaign:
    """A sim campaign served by the four services on an event loop in a thread of its own
    (the browser's calls block this thread)."""

    def __init__(self, home: Path, campaign: str, token: str) -> None:
        self.home = home
        self.nats = EmbeddedNats(home / "nats").start()
        self.settings = sim_settings(
            home,
            self.nats.url,
            campaign=campaign,
            slots=4,
            max_experiments=0,
            api_token=token,
            sim_time_scale=0.5 / 300.0,
        )
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.ready: Future[str] = Future()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.main(),))
        self.thread.start()
        self.url = self.ready.result(timeout=60)
        self.http = httpx.Client(base_url=self.url, timeout=10)

    async def main(self) -> None:
        try:
            self.bus = await Bus.from_settings(self.settings, "browser-test")
            async with services_running(self.settings, self.nats.url):
                await start_campaign(self.bus, self.settings)
                self.ready.set_result(await wait_for_ledger_url(self.home))
                await self.stop.wait()
            await self.bus.close()
        except BaseException as exc:
            if not self.ready.done():
                self.ready.set_exception(exc)
            raise

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def get(self, path: str, **params: Any) -> Any:
        response = self.http.get(path, params=params)
        assert response.status_code == 200, (path, response.text)
        return response.json()

    def close(self) -> None:
        self.http.close()
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop.set)
            self.thread.join(timeout=60)
        self.loop.close()
        self.nats.stop()


@contextlib.contextmanager
def chromium(binary: str, driver_path: str) -> Iterator[Any]:
    """Headless Chromium with a fresh profile, driven through chromedriver; its console kept."""
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tempfile.mkdtemp(prefix="nightshift-chromium-")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver: Any, check: Callable[[], T], what: str, timeout: float = 15) -> T:
    """Selenium's own poll, for the page and for the API alike."""
    poll = WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
    )
    result: T = poll.until(lambda _: check(), message=f"timed out waiting for {what}")
    return result


def console_errors(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def points(driver: Any) -> list[str]:
    """The chart's points (read at once: the live feed may swap the chart at any moment)."""
    script = "return Array.from(document.querySelectorAll('circle.point'), c => c.dataset.run)"
    found: list[str] = driver.execute_script(script)
    return found


def screenshot(driver: Any, path: Path) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(int(height) + 20, 3000))
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 900)


def read_feed(
    sim: SimCampaign, campaign: str, **headers: str
) -> list[tuple[int, str, dict[str, Any]]]:
    """The live feed's messages (id, event, data) up to its first `update`."""
    out: list[tuple[int, str, dict[str, Any]]] = []
    fields: dict[str, str] = {}
    with sim.http.stream("GET", f"/campaigns/{campaign}/events", headers=headers) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line:
                key, _, value = line.partition(": ")
                fields[key] = value
                continue
            if "event" in fields:
                out.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
                if fields["event"] == "update":
                    return out
            fields = {}
    raise AssertionError(f"the feed ended before an update: {out}")


@contextlib.contextmanager
def guarded_ledger(ledger: Path, token: str) -> Iterator[str]:
    """A second API over the same ledger file that requires the token for reads."""
    app = create_app(ledger, Settings(api_token=token, api_token_reads=True))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "the guarded ledger did not start"
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        app.state.closing.set()  # its live feeds end within a poll
        thread.join(timeout=10)
