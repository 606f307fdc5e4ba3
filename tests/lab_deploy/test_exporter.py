"""prometheus-nats-exporter (the version clients/prometheus-nats-exporter pins), as site.yml deploys
it beside every server of the lab: from the mirror's release archive checked against its
checksums.txt, under a hardened unit, reading its own server's monitor over https with the
cluster's CA, serving /metrics on the node's address only."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import pytest
from nats.js.api import ConsumerConfig

from tests.helpers import nats_lab, on, wait_healthy
from verify.inventory import Cluster, Node
from verify.load import connect

pytestmark = pytest.mark.lab

STREAM = "INFRASTRUCTURE_EVENTS"


def metrics_url(node: Node) -> str:
    return f"http://{node['nats_exporter_listen_address']}:{node['nats_exporter_port']}/metrics"


def scrape(node: Node) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The exporter's samples by metric name: [(labels, value)]."""
    with urllib.request.urlopen(metrics_url(node), timeout=10) as answer:
        text = answer.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        found = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if found and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', found.group(2) or ""))
            samples.setdefault(found.group(1), []).append((labels, float(found.group(3))))
    return samples


def scrape_with(node: Node, metric: str, seconds: float = 30) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A scrape that holds METRIC: the exporter leaves out a series the server has no value for
    at that moment (the meta leader, between an election's start and end)."""
    deadline = time.monotonic() + seconds
    while metric not in (samples := scrape(node)) and time.monotonic() < deadline:
        time.sleep(1)
    return samples


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    (only,) = samples[name]
    return only[1]


def test_every_node_serves_its_own_servers_metrics(deployed_lab: Cluster) -> None:
    members = {n.server_name for n in deployed_lab.nodes}
    wait_healthy(deployed_lab)  # an earlier test's fault may have left an election running
    seen_leaders: dict[str, str] = {}
    varz_leaders: dict[str, str | None] = {}
    for node in deployed_lab.nodes:
        samples = scrape(node)
        # Its own server, by name (-use_internal_server_name), healthy, routed to both others.
        assert {labels["server_id"] for labels, _ in samples["gnatsd_varz_connections"]} == {node.server_name}
        assert value(samples, "gnatsd_healthz_status") == 0, node.host
        assert value(samples, "gnatsd_routez_num_routes") == len(members) - 1, node.host
        assert value(samples, "gnatsd_varz_jetstream_meta_cluster_size") == len(members)
        # The meta leader as the alert rules read it: the jsz series' labels.
        ((labels, disabled),) = samples["jetstream_server_jetstream_disabled"]
        assert disabled == 0
        seen_leaders[node.server_name] = labels["meta_leader"]
        assert labels["is_meta_leader"] == str(labels["meta_leader"] == node.server_name).lower(), labels
        varz = samples.get("gnatsd_varz_jetstream_meta_leader", [])
        varz_leaders[node.server_name] = varz[0][0]["value"] if varz else None
        # JetStream down to the stream (-jsz=streams): the CIM's stream on every member.
        streams = {labels["stream_name"] for labels, _ in samples["jetstream_stream_total_messages"]}
        assert STREAM in streams, streams
    (leader,) = set(seen_leaders.values())
    assert leader in members, seen_leaders
    # This release's varz leader gauge is sometimes left out (seen on the leader itself); no rule
    # reads it, but where it is served it names the same leader.
    assert set(varz_leaders.values()) <= {leader, None}, varz_leaders


def stream_consumers_by_node(cluster: Cluster) -> dict[str, float]:
    """Each node's jetstream_stream_consumer_count for the CIM's stream, with no per-consumer series."""
    counts = {}
    for node in cluster.nodes:
        samples = scrape(node)
        assert not [name for name in samples if name.startswith("jetstream_consumer_")], node.host
        (count,) = [v for labels, v in samples["jetstream_stream_consumer_count"] if labels["stream_name"] == STREAM]
        counts[node.host] = count
    return counts


def test_ephemeral_consumers_are_counted_but_add_no_series(deployed_lab: Cluster) -> None:
    """Every CIM read makes an ephemeral consumer: per-consumer series would grow Prometheus
    without bound. The stream's consumer count still shows them, summed over the servers as
    NatsStreamConsumersHigh sums it: each server counts only the R1 consumers it hosts."""
    created = 12

    async def counts_while_open() -> tuple[dict[str, float], dict[str, float]]:
        nc = await connect(deployed_lab, "exporter-cardinality")
        try:
            js = nc.jetstream(timeout=10)
            before = await asyncio.to_thread(stream_consumers_by_node, deployed_lab)
            config = ConsumerConfig(inactive_threshold=60, num_replicas=1)
            names = [(await js.add_consumer(STREAM, config)).name for _ in range(created)]
            try:
                return before, await asyncio.to_thread(stream_consumers_by_node, deployed_lab)
            finally:
                for name in names:
                    await js.delete_consumer(STREAM, name)
        finally:
            await nc.close()

    before, during = asyncio.run(counts_while_open())
    print(f"{STREAM} consumers per node: before {before}, with {created} ephemerals open {during}")
    assert sum(during.values()) - sum(before.values()) == created, (before, during)


def test_the_exporter_is_hardened_and_listens_on_the_node_address_only(deployed_lab: Cluster) -> None:
    for node in deployed_lab.nodes:
        user = on(node.host, "ps -o user= -C prometheus-nats-exporter").split()
        assert user and "root" not in user, user
        exposure = on(node.host, "systemd-analyze security prometheus-nats-exporter --no-pager | tail -1")
        level = float(re.search(r"level for \S+: (\d+\.\d+)", exposure).group(1))  # type: ignore[union-attr]
        assert level <= 2.0, exposure
        listening = on(node.host, f"ss -Hltn 'sport = :{node['nats_exporter_port']}'")
        assert [line.split()[3] for line in listening.splitlines()] == [
            f"{node['nats_exporter_listen_address']}:{node['nats_exporter_port']}"
        ], listening


def test_a_stopped_server_leaves_its_exporter_up_and_its_health_gone(deployed_lab: Cluster) -> None:
    """What the node-down alert reads: the target still answers, its healthz and JetStream series are
    gone, and they come back once the server does. This release keeps serving the last varz, routez
    and subz values of a server it cannot reach, so no alert may read those for liveness."""
    node = next(n for n in deployed_lab.nodes if n.host == "nats-3")
    assert nats_lab("fault", "stop", node.host).returncode == 0
    try:
        samples = scrape(node)
        assert "gnatsd_healthz_status" not in samples, samples.get("gnatsd_healthz_status")
        assert not [name for name in samples if name.startswith("jetstream_")], sorted(samples)
        assert "gnatsd_varz_connections" in samples  # stale, as said above: pinned so a change shows
    finally:
        nats_lab("heal", node.host)
    wait_healthy(deployed_lab)
    samples = scrape_with(node, "gnatsd_healthz_status")
    assert value(samples, "gnatsd_healthz_status") == 0
    assert value(samples, "jetstream_server_jetstream_disabled") == 0
