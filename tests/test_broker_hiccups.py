"""Services ride out the broker (issue 12): a launcher exited with an unhandled
`nats.errors.TimeoutError` while the broker restarted (the connect was retried, the stream
set-up after it was not; a nats-server without JetStream took the same path). A service
now ends only on a signal or a fatal configuration error."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.broker import EmbeddedNats, free_port, nats_server_binary
from services.bus import Bus
from services.settings import Settings
from tests.e2e_helpers import sim_env
from tests.eventually import eventually


def test_a_service_waits_for_jetstream_then_serves(tmp_path: Path) -> None:
    port = free_port()
    plain = subprocess.Popen(  # a nats-server without JetStream
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"nats://127.0.0.1:{port}"
    env = sim_env(tmp_path / "home", url)
    service = subprocess.Popen(
        [sys.executable, "-m", "services.evaluator"],
        env=env,
        stdout=(tmp_path / "evaluator.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    server: EmbeddedNats | None = None
    try:
        time.sleep(4.0)
        assert service.poll() is None, (tmp_path / "evaluator.log").read_text()[-2000:]
        plain.send_signal(signal.SIGTERM)  # the broker goes, then comes back with JetStream
        plain.wait(10)
        time.sleep(1.0)
        assert service.poll() is None, (tmp_path / "evaluator.log").read_text()[-2000:]
        server = EmbeddedNats(tmp_path / "nats", port=port).start()
        asyncio.run(consumer_appears(url, "evaluator"))
        assert service.poll() is None
        service.send_signal(signal.SIGTERM)
        assert service.wait(20) == 0
    finally:
        for proc in (service, plain):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if server is not None:
            server.stop()


async def consumer_appears(url: str, durable: str) -> None:
    bus = await Bus.from_settings(Settings(nats_url=url), "test")
    try:
        await eventually(lambda: bus.consumer_lag(durable), timeout=30, what=f"consumer {durable}")
    finally:
        await bus.close()
