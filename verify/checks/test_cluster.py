"""The cluster as its monitor endpoints and the JetStream API describe it."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from verify.client import connect
from verify.inventory import Cluster, Node
from verify.plugin import RunState, answering_nodes, client_urls, monitor_json, monitor_reply
from verify.streams import stream_spec

pytestmark = pytest.mark.cluster


def _answers(state: RunState, cluster: Cluster, path: str) -> dict[str, Any]:
    """path from every node that answers; the silent ones are named in the failure."""
    answers, silent = {}, []
    for node in cluster.nodes:
        try:
            answers[node.host] = monitor_json(state, node, path)
        except pytest.fail.Exception:
            silent.append(node.host)
    if not answers:
        pytest.fail(f"no node's monitor port answers ({', '.join(silent)})", pytrace=False)
    return answers


@pytest.mark.runbook("cluster")
def test_full_healthz(nats_node: Node, verify_state: RunState) -> None:
    reply = monitor_reply(verify_state, nats_node, "/healthz")
    if reply.status != 200:
        try:
            detail = "; ".join(e.get("error", str(e)) for e in reply.json.get("errors", [])) or reply.json.get("error")
        except ValueError:
            detail = reply.body[:200]
        pytest.fail(f"{nats_node.host}: /healthz {reply.status}: {detail}", pytrace=False)


@pytest.mark.runbook("config")
def test_one_version_and_cluster_name(nats_cluster: Cluster, verify_state: RunState) -> None:
    varz = _answers(verify_state, nats_cluster, "/varz")
    versions = {host: v["version"] for host, v in varz.items()}
    names = {host: v["cluster"].get("name") for host, v in varz.items()}
    assert set(versions.values()) == {nats_cluster.setting("nats_server_version")}, f"versions: {versions}"
    assert set(names.values()) == {nats_cluster.setting("nats_server_cluster_name")}, f"cluster names: {names}"


@pytest.mark.runbook("cluster")
def test_routes_reach_every_peer(nats_node: Node, nats_cluster: Cluster, verify_state: RunState) -> None:
    routes = monitor_json(verify_state, nats_node, "/routez").get("routes") or []
    reached = {r["remote_name"] for r in routes}
    peers = {n.server_name for n in nats_cluster.nodes} - {nats_node.server_name}
    assert peers <= reached, f"{nats_node.host}: no route to {', '.join(sorted(peers - reached))}"


# How long a request may take to cross one route, retries for interest to propagate included.
ROUTE_CROSSING_SECONDS = 2.0


@pytest.mark.runbook("cluster")
def test_messages_cross_every_route(nats_cluster: Cluster, verify_state: RunState) -> None:
    """A request from each node to a responder on each other node, in the application account.

    /routez lists a route that is stalled (after a partition heals, TCP waits out its
    retransmission backoff) and /healthz stays 200, yet nothing crosses it: only traffic shows it.
    """
    prefix = f"_verify.routes.{verify_state.run_id}"
    nodes = answering_nodes(verify_state, nats_cluster)

    async def ask(source: Client, target: str) -> bool:
        deadline = asyncio.get_running_loop().time() + ROUTE_CROSSING_SECONDS
        while asyncio.get_running_loop().time() < deadline:
            try:
                reply = await source.request(f"{prefix}.{target}", b"", timeout=0.3)
                return reply.data == target.encode()
            except nats.errors.NoRespondersError:
                await asyncio.sleep(0.05)  # the responder's interest has not reached this node yet
            except nats.errors.TimeoutError:
                pass
        return False

    async def cross() -> list[str]:
        attempts = await asyncio.gather(
            *(connect([n.client_url], verify_state, login=nats_cluster.login()) for n in nodes),
            return_exceptions=True,
        )
        connections = {n.host: c for n, c in zip(nodes, attempts, strict=True) if isinstance(c, Client)}
        problems = [
            f"{n.host}: no client connection ({c})"
            for n, c in zip(nodes, attempts, strict=True)
            if n.host not in connections
        ]
        try:
            for host, nc in connections.items():

                async def answer(msg: Msg, host: str = host) -> None:
                    await msg.respond(host.encode())

                await nc.subscribe(f"{prefix}.{host}", cb=answer)
                await nc.flush(timeout=1)
            pairs = [(a, b) for a in connections for b in connections if a != b]
            crossed = await asyncio.gather(*(ask(connections[a], b) for a, b in pairs))
            problems += [
                f"{a} -> {b}: no reply within {ROUTE_CROSSING_SECONDS:.0f} s"
                for (a, b), ok in zip(pairs, crossed, strict=True)
                if not ok
            ]
        finally:
            await asyncio.gather(*(nc.close() for nc in connections.values()), return_exceptions=True)
        return problems

    problems = asyncio.run(asyncio.wait_for(cross(), min(6.0, max(1.0, verify_state.remaining()))))
    assert not problems, "messages do not cross the routes: " + "; ".join(problems)


@pytest.mark.runbook("cluster")
def test_meta_leader_and_every_peer_current(nats_cluster: Cluster, verify_state: RunState) -> None:
    jsz = _answers(verify_state, nats_cluster, "/jsz")
    leaders = {host: j.get("meta_cluster", {}).get("leader") for host, j in jsz.items()}
    known = {v for v in leaders.values() if v}
    assert len(known) == 1, f"meta leader: {leaders or 'none'} (JetStream answers 10008 without one)"
    (leader_name,) = known
    leader = next((n for n in nats_cluster.nodes if n.server_name == leader_name), None)
    assert leader is not None, f"meta leader {leader_name} is not in the inventory"
    meta = monitor_json(verify_state, leader, "/jsz")["meta_cluster"]
    assert meta.get("cluster_size") == len(nats_cluster.nodes), (
        f"meta group size {meta.get('cluster_size')}, inventory has {len(nats_cluster.nodes)} (stale or missing peers)"
    )
    behind = [r["name"] for r in meta.get("replicas", []) if not r.get("current") or r.get("offline")]
    assert not behind, f"meta peers not current with leader {leader_name}: {', '.join(behind)}"


@pytest.mark.runbook("config")
def test_jetstream_domain(nats_node: Node, verify_state: RunState) -> None:
    config = monitor_json(verify_state, nats_node, "/jsz").get("config", {})
    assert config.get("domain") == nats_node["nats_server_jetstream_domain"], (
        f"{nats_node.host}: domain {config.get('domain')!r}"
    )
    assert config.get("store_dir") == f"{nats_node['nats_server_jetstream_store_dir']}/jetstream", (
        f"{nats_node.host}: store_dir {config.get('store_dir')!r}"
    )


@pytest.mark.runbook("cluster")
def test_account_jetstream_usage(nats_cluster: Cluster, verify_state: RunState) -> None:
    """What `nats account info` shows; fails with the server's words (e.g. 10008) when it cannot."""

    async def usage() -> Any:
        nc = await connect(client_urls(verify_state, nats_cluster), verify_state, login=nats_cluster.login())
        try:
            return await nc.jetstream(timeout=2).account_info()
        finally:
            await nc.close()

    info = asyncio.run(asyncio.wait_for(usage(), min(5.0, max(1.0, verify_state.remaining()))))
    assert info.limits is not None
    verify_state.report.append(
        f"account JetStream: memory {info.memory} B, storage {info.storage} B, "
        f"streams {info.streams}, consumers {info.consumers}"
    )


@pytest.mark.runbook("cluster")
def test_streams_have_leaders_and_current_replicas(nats_cluster: Cluster, verify_state: RunState) -> None:
    """`nats stream report`: every stream's leader and replicas, lagging or offline ones named."""
    problems = []
    for stream in sorted(_stream_details(verify_state, nats_cluster), key=lambda s: str(s["name"])):
        name = stream["name"]
        cluster = stream.get("cluster") or {}
        replicas = stream.get("config", {}).get("num_replicas", 1)
        behind = [
            f"{r['name']} {'offline' if r.get('offline') else 'lagging'}"
            for r in cluster.get("replicas") or []
            if r.get("offline") or not r.get("current")
        ]
        state = stream.get("state") or {}
        verify_state.report.append(
            f"stream {name}: replicas {replicas}, leader {cluster.get('leader') or 'none'}, "
            f"behind: {', '.join(behind) or 'none'}, messages {state.get('messages', 0)}, "
            f"consumers {state.get('consumer_count', 0)}"
        )
        if replicas > 1 and not cluster.get("leader"):
            problems.append(f"{name}: no leader")
        problems.extend(f"{name}: replica {b}" for b in behind)
    assert not problems, "; ".join(problems)


@pytest.mark.runbook("consumers")
def test_no_stale_consumer_build_up(
    nats_cluster: Cluster, verify_state: RunState, request: pytest.FixtureRequest
) -> None:
    threshold = request.config.getoption("--max-consumers-per-stream")
    crowded = {
        stream["name"]: stream.get("state", {}).get("consumer_count", 0)
        for stream in _stream_details(verify_state, nats_cluster)
        if stream.get("state", {}).get("consumer_count", 0) > threshold
    }
    assert not crowded, f"consumers per stream above {threshold}: {crowded}"


def _stream_details(state: RunState, cluster: Cluster) -> list[dict[str, Any]]:
    """Every stream as its own leader reports it (only the leader knows whether its replicas are
    current); a stream without a leader as any node reports it."""
    by_name: dict[str, dict[str, Any]] = {}
    for node in cluster.nodes:
        try:
            detail = monitor_json(state, node, "/jsz?accounts=true&streams=true&config=true")
        except pytest.fail.Exception:
            continue
        for account in detail.get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                from_leader = (stream.get("cluster") or {}).get("leader") == node.server_name
                if from_leader or stream["name"] not in by_name:
                    by_name[stream["name"]] = stream
    if not by_name and all(f"monitor:{n.host}" in state.unreachable for n in cluster.nodes):
        pytest.fail("no node's monitor port answers", pytrace=False)
    return list(by_name.values())


@pytest.mark.runbook("streams")
def test_declared_streams_match_and_span_three_nodes(nats_cluster: Cluster, verify_state: RunState) -> None:
    """Each stream in jetstream_streams_declared exists as declared, its replicas on distinct nodes, all current."""
    declared = nats_cluster.nodes[0].settings.get("jetstream_streams_declared") or []
    spec = stream_spec()

    async def inspect() -> list[str]:
        nc = await connect(client_urls(verify_state, nats_cluster), verify_state, login=nats_cluster.login())
        problems = []
        try:
            js = nc.jetstream(timeout=2)
            for stream in declared:
                desired = spec.desired_config(stream)
                try:
                    info = await js.stream_info(desired["name"])
                except nats.js.errors.NotFoundError:
                    problems.append(f"{desired['name']}: missing")
                    continue
                diff = spec.changes(info.config.as_dict(), desired)
                problems += [f"{desired['name']}: {k} is {now}, declared {want}" for k, (now, want) in diff.items()]
                placed = [info.cluster.leader] + [r.name for r in info.cluster.replicas or []] if info.cluster else []
                if len(set(placed)) != desired["num_replicas"] or None in placed:
                    problems.append(f"{desired['name']}: replicas on {placed}, declared {desired['num_replicas']}")
                behind = [r.name for r in (info.cluster.replicas if info.cluster else None) or [] if not r.current]
                if behind:
                    problems.append(f"{desired['name']}: replicas not current on {behind}")
        finally:
            await nc.close()
        return problems

    problems = asyncio.run(asyncio.wait_for(inspect(), min(5.0, max(1.0, verify_state.remaining()))))
    assert not problems, "; ".join(problems)
