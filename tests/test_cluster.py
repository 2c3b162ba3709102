"""A three-node NATS cluster with R3 streams and buckets survives the loss of a node.

Real nats-server processes on loopback, started from deploy/nats-cluster.conf (a user and
password required) and routed to each other; the four services run (in this process, as
`nightshift up` runs them) against the cluster's URL list with `replicas = 3` and the
credentials. A node is SIGKILLed in the middle of a sim campaign and restarted later, then
the stream's leader is: each campaign completes with one result per variant.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

from services import contracts
from services.broker import EmbeddedNats
from services.bus import Bus
from services.campaign import start_campaign
from services.contracts import CampaignStopped, ResultEvaluated, VariantProposed
from services.settings import Settings
from tests.e2e_helpers import history, services_running, sim_settings
from tests.eventually import eventually
from tests.nats_cluster import ClusterNode, NatsCluster

EXPERIMENTS = 16
USER, PASSWORD = "nightshift", "cluster-pw-5e1d"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    nodes = NatsCluster(tmp_path / "cluster", USER, PASSWORD).start()
    yield nodes
    nodes.stop()


@pytest.fixture
def settings(tmp_path: Path, cluster: NatsCluster) -> Settings:
    # Runs of ~0.4 s on 4 slots: a campaign lasts a few seconds, long enough to lose a node in.
    return sim_settings(
        tmp_path,
        cluster.url,
        replicas=3,
        nats_user=USER,
        nats_password=PASSWORD,
        max_experiments=EXPERIMENTS,
        sim_time_scale=0.4 / 300.0,
        ack_wait_s=5.0,
    )


@pytest.fixture
async def cluster_bus(settings: Settings) -> AsyncIterator[Bus]:
    connected = await Bus.from_settings(settings, "test")
    yield connected
    await connected.close()


async def stream_leader(bus: Bus) -> str:
    info = await bus.nc.jetstream().stream_info(bus.stream)
    assert info.cluster is not None and info.cluster.leader
    return str(info.cluster.leader)


async def results_of(bus: Bus, campaign: str) -> list[ResultEvaluated]:
    return [
        e
        for e in await history(bus, [ResultEvaluated])
        if isinstance(e, ResultEvaluated) and e.campaign == campaign
    ]


async def campaign_survives(
    bus: Bus, cluster: NatsCluster, settings: Settings, victim: ClusterNode
) -> None:
    """Run a campaign; SIGKILL `victim` after its first results, restart it a while later;
    the campaign completes, and the ledger holds one result per variant, none lost."""
    name = settings.campaign
    await start_campaign(bus, settings)

    async def some_results() -> bool:
        return len(await results_of(bus, name)) >= 3

    await eventually(some_results, 30, f"three results of {name}", interval=0.2)
    victim.kill()
    await asyncio.sleep(2.0)  # the campaign goes on with two nodes of three
    await asyncio.to_thread(cluster.restart, victim)

    async def stopped() -> bool:
        return any(
            isinstance(e, CampaignStopped) and e.campaign == name
            for e in await history(bus, [CampaignStopped])
        )

    await eventually(stopped, 60, f"campaign {name} to complete", interval=0.3)
    url = (Path(settings.home) / "ledger.url").read_text().strip()

    async def ledger_has_all() -> bool:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            rows = (await http.get(f"/campaigns/{name}/results.tsv")).text.splitlines()[1:]
        return len(rows) >= EXPERIMENTS

    # A delivery lost with the node (its ack or the message) comes again after the ledger's
    # ack wait (30 s): the wait covers one.
    t0 = time.monotonic()
    try:
        await eventually(ledger_has_all, 45, f"the ledger to record {name}", interval=0.3)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; ledger consumer: {await bus.consumer_lag('ledger')}") from exc
    print(f"{name}: the ledger recorded every result {time.monotonic() - t0:.1f}s after the stop")
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        rows = (await http.get(f"/campaigns/{name}/results.tsv")).text.splitlines()[1:]
    variants = [row.split("\t")[0] for row in rows]
    assert len(variants) == EXPERIMENTS, rows
    assert len(set(variants)) == EXPERIMENTS, f"a variant has two results: {sorted(variants)}"
    evaluated = {r.variant_id for r in await results_of(bus, name) if r.status != "infra"}
    assert set(variants) == evaluated
    proposed = {
        e.variant_id
        for e in await history(bus, [VariantProposed])
        if isinstance(e, VariantProposed) and e.campaign == name
    }
    assert proposed == set(variants), "a proposed variant has no result"


async def test_campaigns_survive_a_killed_node_and_a_killed_stream_leader(
    cluster: NatsCluster, cluster_bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    js = cluster_bus.nc.jetstream()
    info = await js.stream_info(cluster_bus.stream)
    assert info.config.num_replicas == 3
    for bucket in (contracts.SOURCES_BUCKET, contracts.LOGS_BUCKET):
        assert (await js.stream_info(f"OBJ_{bucket}")).config.num_replicas == 3
    assert (await js.stream_info(f"KV_{contracts.CAMPAIGNS_BUCKET}")).config.num_replicas == 3
    # A client left at the default (the CLI without NIGHTSHIFT_REPLICAS) keeps them at three.
    default_client = await Bus.from_settings(msgspec.structs.replace(settings, replicas=1), "cli")
    await default_client.close()
    assert (await js.stream_info(cluster_bus.stream)).config.num_replicas == 3

    async with services_running(settings, cluster.url):
        # A node that is not the stream's leader first, then the leader itself.
        leader = await stream_leader(cluster_bus)
        follower = next(n for n in cluster.nodes if n.name != leader)
        await campaign_survives(cluster_bus, cluster, settings, follower)

        second = msgspec.structs.replace(settings, campaign="leaderless")
        leader_node = cluster.node(await stream_leader(cluster_bus))
        await campaign_survives(cluster_bus, cluster, second, leader_node)


async def test_more_replicas_than_servers_fail_at_start_naming_the_setting(
    nats_server: EmbeddedNats,
) -> None:
    with pytest.raises(ConnectionError, match="NIGHTSHIFT_REPLICAS") as failed:
        await Bus.from_settings(Settings(nats_url=nats_server.url, replicas=3), "ledger")
    assert "non-clustered" in str(failed.value)
