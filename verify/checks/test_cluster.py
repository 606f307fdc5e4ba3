"""The cluster as its monitor endpoints and the JetStream API describe it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from verify import limits, monitor, replicas
from verify.client import connect
from verify.inventory import Cluster, Node
from verify.plugin import RUNBOOKS, RunState, answering_nodes, client_urls, monitor_json, monitor_reply
from verify.streams import stream_spec

pytestmark = pytest.mark.cluster

# Every stream each server holds a replica of, with its own replica's state and the stream's
# config: fetched once per node for the run (jsz_details), read by several checks.
DETAIL = "/jsz?accounts=true&streams=true&config=true"
# What the replica check samples again when the first sample shows replicas apart.
REPLICA_STATE = "/jsz?accounts=true&streams=true"
# How long the replica check re-samples at most, and how often.
REPLICA_WINDOW_SECONDS = 2.0
REPLICA_INTERVAL_SECONDS = 0.2


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


@pytest.fixture(scope="session")
def jsz_details(nats_cluster: Cluster, verify_state: RunState) -> dict[str, Any]:
    """DETAIL of every node that answers (host -> /jsz), fetched once for all the checks below."""
    details = {}
    for node in nats_cluster.nodes:
        try:
            details[node.host] = monitor_json(verify_state, node, DETAIL)
        except pytest.fail.Exception:
            continue  # named by the checks of that node (monitor_json recorded why)
    return details


class JetStreamError(Exception):
    """The JetStream API answered with an error (its description and code), or not at all."""


@dataclass
class JetStreamView:
    """The account as the JetStream API reports it: account info (`$JS.API.INFO`) and every
    stream's STREAM.INFO, answered by the stream's leader: `state.consumer_count` there counts
    the stream's consumers cluster-wide (a node's /jsz counts only those it knows)."""

    account: str
    info: dict[str, Any] = field(default_factory=dict)
    streams: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Streams whose STREAM.INFO failed (no leader, timeout), with the error.
    unread: dict[str, str] = field(default_factory=dict)
    error: str = ""

    def require(self) -> None:
        if self.error:
            pytest.fail(self.error, pytrace=False)

    def consumers(self, stream: str) -> str:
        """The report's consumer figure for a stream: cluster-wide, or why it is not known."""
        if stream in self.streams:
            return str(int((self.streams[stream].get("state") or {}).get("consumer_count") or 0))
        return f"? ({self.unread.get(stream) or self.error or 'no STREAM.INFO'})"


async def _api(nc: Client, subject: str, payload: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    try:
        message = await nc.request(subject, json.dumps(payload).encode() if payload else b"", timeout=timeout)
    except (nats.errors.Error, TimeoutError) as error:
        raise JetStreamError(f"{subject}: {type(error).__name__} {error}".strip()) from error
    reply: dict[str, Any] = json.loads(message.data)
    if reply.get("error"):
        problem = reply["error"]
        raise JetStreamError(f"{subject}: {problem.get('description')} ({problem.get('err_code')})")
    return reply


async def read_jetstream(
    nc: Client, timeout: float = 2.0, account: str | None = None, fallback: str = "?"
) -> JetStreamView:
    """Account info, then STREAM.INFO of every stream at once. The account's name is `account`,
    or what `$SYS.REQ.USER.INFO` says about this login (`fallback` if it does not say).
    Raises JetStreamError when account info or the stream list fails."""

    async def who() -> str:
        if account:
            return account
        try:
            reply = json.loads((await nc.request("$SYS.REQ.USER.INFO", b"", timeout=min(timeout, 1.0))).data)
            data = reply.get("data") or {}
            return str(data.get("account_name") or data.get("account") or fallback)
        except (nats.errors.Error, TimeoutError, ValueError):
            return fallback

    name, info = await asyncio.gather(who(), _api(nc, "$JS.API.INFO", None, timeout))
    names: list[str] = []
    while True:
        page = await _api(nc, "$JS.API.STREAM.NAMES", {"offset": len(names)}, timeout)
        names += page.get("streams") or []
        if not page.get("streams") or len(names) >= int(page.get("total") or 0):
            break
    answers = await asyncio.gather(
        *(_api(nc, f"$JS.API.STREAM.INFO.{n}", None, timeout) for n in names), return_exceptions=True
    )
    view = JetStreamView(account=name, info=info)
    for stream, answer in zip(names, answers, strict=True):
        if isinstance(answer, dict):
            view.streams[stream] = answer
        else:
            view.unread[stream] = str(answer)
    return view


@pytest.fixture(scope="session")
def jetstream_view(nats_cluster: Cluster, verify_state: RunState) -> JetStreamView:
    """read_jetstream once for the run, as verify's login; a failure is kept in `error` and fails
    the checks that need the view."""
    fallback = str(nats_cluster.nodes[0].settings.get("nats_server_app_account") or "?")
    seconds = min(5.0, max(1.0, verify_state.remaining()))
    try:
        servers = client_urls(verify_state, nats_cluster)
    except pytest.fail.Exception as failure:
        return JetStreamView(fallback, error=f"account info: {failure.msg}")

    async def read() -> JetStreamView:
        nc = await connect(servers, verify_state, login=nats_cluster.login())
        try:
            return await read_jetstream(nc, timeout=min(2.0, seconds), fallback=fallback)
        finally:
            await nc.close()

    try:
        return asyncio.run(asyncio.wait_for(read(), seconds))
    except TimeoutError:
        return JetStreamView(fallback, error=f"account info and STREAM.INFO: no answer within {seconds:.0f} s")
    except Exception as error:  # any failure to read is the checks' finding, not a crash
        return JetStreamView(fallback, error=f"account info: {type(error).__name__}: {error}")


def default_max_consumers(details: dict[str, Any]) -> Any:
    """The servers' default per-stream consumer limit (/jsz `limits`), when any node reports one."""
    found = [(j.get("limits") or {}).get("default_max_consumers") for j in details.values()]
    return next((v for v in found if limits.limited(v)), None)


def judge(state: RunState, usages: Iterable[limits.Usage | None]) -> list[str]:
    """Warnings (80%) go to the run's warnings with their runbook; returns the failures (100%)."""
    warnings, failures = limits.judge(usages)
    state.warnings += [f"{u.message()}; next: {RUNBOOKS[u.runbook]}" for u in warnings]
    return [u.message() for u in failures]


@pytest.fixture(scope="session")
def healthz_replies(nats_cluster: Cluster, verify_state: RunState) -> dict[str, monitor.Reply]:
    """/healthz of every node, asked all at once: the run's first contact, so nodes that do not
    answer cost one timeout together, not one each, and are known to every check after."""

    def ask(node: Node) -> monitor.Reply | None:
        try:
            return monitor_reply(verify_state, node, "/healthz")
        except pytest.fail.Exception:
            return None  # the node's check fails with what monitor_reply recorded

    with ThreadPoolExecutor(max_workers=len(nats_cluster.nodes)) as pool:
        replies = list(pool.map(ask, nats_cluster.nodes))
    return {node.host: reply for node, reply in zip(nats_cluster.nodes, replies, strict=True) if reply is not None}


@pytest.mark.runbook("cluster")
def test_full_healthz(nats_node: Node, healthz_replies: dict[str, monitor.Reply], verify_state: RunState) -> None:
    reply = healthz_replies.get(nats_node.host) or monitor_reply(verify_state, nats_node, "/healthz")
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
    if not nodes:
        pytest.fail("not tried: no node answered earlier in this run", pytrace=False)

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
    # A lost member's name lingers until it is removed (replace-node.yml); a stranger should never be.
    peers = {leader_name} | {r["name"] for r in meta.get("replicas", [])}
    members = {n.server_name for n in nats_cluster.nodes}
    assert peers == members, (
        f"meta group {', '.join(sorted(peers))}, inventory {', '.join(sorted(members))} (not members: "
        f"{', '.join(sorted(peers - members)) or 'none'}; missing: {', '.join(sorted(members - peers)) or 'none'})"
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
def test_account_jetstream_usage(
    jetstream_view: JetStreamView, jsz_details: dict[str, Any], verify_state: RunState
) -> None:
    """What `nats account info` shows, against the account's limits; fails with the server's words
    (e.g. 10008) when it cannot."""
    jetstream_view.require()
    assert "limits" in jetstream_view.info, f"account info without limits: {jetstream_view.info}"
    verify_state.report.append(
        limits.account_line(
            jetstream_view.account, jetstream_view.info, jetstream_view.streams, default_max_consumers(jsz_details)
        )
    )


@pytest.mark.runbook("cluster")
def test_streams_have_leaders_and_current_replicas(
    nats_cluster: Cluster, jsz_details: dict[str, Any], jetstream_view: JetStreamView, verify_state: RunState
) -> None:
    """`nats stream report`: every stream's leader and replicas, lagging or offline ones named;
    its consumers as STREAM.INFO counts them (cluster-wide)."""
    problems = []
    for stream in sorted(_stream_details(verify_state, nats_cluster, jsz_details), key=lambda s: str(s["name"])):
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
            f"bytes {limits.human_bytes(int(state.get('bytes') or 0))}, consumers {jetstream_view.consumers(name)}"
        )
        if replicas > 1 and not cluster.get("leader"):
            problems.append(f"{name}: no leader")
        problems.extend(f"{name}: replica {b}" for b in behind)
    assert not problems, "; ".join(problems)


@pytest.mark.runbook("consumers")
def test_no_stale_consumer_build_up(
    jetstream_view: JetStreamView, verify_state: RunState, request: pytest.FixtureRequest
) -> None:
    """More consumers on a stream than --max-consumers-per-stream, counted cluster-wide."""
    jetstream_view.require()
    threshold = request.config.getoption("--max-consumers-per-stream")
    counts = {
        name: int((stream.get("state") or {}).get("consumer_count") or 0)
        for name, stream in sorted(jetstream_view.streams.items())
    }
    crowded = {name: count for name, count in counts.items() if count > threshold}
    assert not crowded, f"consumers per stream above {threshold}: {crowded}"


@pytest.mark.runbook("consumers")
def test_consumer_limits_not_reached(
    jetstream_view: JetStreamView, jsz_details: dict[str, Any], verify_state: RunState
) -> None:
    """Each stream's consumers (cluster-wide) against the limit the server applies to that stream:
    its own max_consumers, or the account's (counted per stream), or the server default."""
    jetstream_view.require()
    usages = limits.consumer_usages(jetstream_view.streams, jetstream_view.info, default_max_consumers(jsz_details))
    failures = judge(verify_state, usages)
    assert not failures, "; ".join(failures)


@pytest.mark.runbook("capacity")
def test_account_and_stream_limits_not_reached(jetstream_view: JetStreamView, verify_state: RunState) -> None:
    """The account's memory, storage and streams against its limits; each stream's bytes and
    messages against its max_bytes and max_msgs."""
    jetstream_view.require()
    usages = limits.account_usages(jetstream_view.account, jetstream_view.info)
    for name, stream in sorted(jetstream_view.streams.items()):
        usages += limits.stream_usages(name, stream)
    failures = judge(verify_state, usages)
    assert not failures, "; ".join(failures)


@pytest.mark.runbook("capacity")
def test_server_store_limits_not_reached(nats_node: Node, jsz_details: dict[str, Any], verify_state: RunState) -> None:
    """The node's JetStream store (its replicas of every stream) against its max_file_store and
    max_memory_store (/jsz config), and its HA assets against max_ha_assets when set."""
    jsz = jsz_details.get(nats_node.host) or monitor_json(verify_state, nats_node, DETAIL)
    failures = judge(verify_state, limits.server_usages(nats_node.host, jsz))
    assert not failures, "; ".join(failures)


def replica_samples(state: RunState, nodes: list[Node], pool: ThreadPoolExecutor) -> dict[str, Any]:
    """REPLICA_STATE of the nodes, asked all at once so the replicas are seen at one moment."""

    def ask(node: Node) -> Any:
        try:
            return monitor_json(state, node, REPLICA_STATE)
        except pytest.fail.Exception:
            return None  # reported by that node's checks; left out of the comparison

    answers = list(pool.map(ask, nodes))
    return {node.host: answer for node, answer in zip(nodes, answers, strict=True) if answer is not None}


def compare_replicas(
    state: RunState, cluster: Cluster, first: dict[str, Any] | None = None, window: float = REPLICA_WINDOW_SECONDS
) -> list[str]:
    """replicas.settle over the answering nodes' monitors; notes go to the report, returns the
    streams whose replicas never agreed."""
    nodes = answering_nodes(state, cluster)
    if first:
        # A node missing from the first fetch did not answer it (monitor_json said why).
        nodes = [n for n in nodes if n.host in first]
        first = {n.host: first[n.host] for n in nodes} or None
    hosts_by_server = {n.server_name: n.host for n in cluster.nodes}
    window = min(window, max(0.0, state.remaining() - 1.0))
    with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
        settled = replicas.settle(
            lambda: replica_samples(state, nodes, pool),
            hosts_by_server,
            first=first,
            window=window,
            interval=REPLICA_INTERVAL_SECONDS,
        )
    answering = answering_nodes(state, cluster)
    silent = [n.host for n in cluster.nodes if n not in nodes or n not in answering]
    accounts = {account for account, _ in (*settled.divergent, *settled.trailing)}

    def named(key: replicas.StreamKey) -> str:
        return key[1] if len(accounts) <= 1 else f"{key[1]} (account {key[0]})"

    sampled = f"{settled.samples} sample{'s' if settled.samples > 1 else ''} in {settled.seconds:.1f} s"
    state.report.append(
        f"replicas: {settled.compared} streams compared, {len(settled.divergent)} differ ({sampled})"
        + (f"; not compared on {', '.join(silent)} (not answering)" if silent else "")
    )
    state.report += [
        f"replicas of {named(key)}: trailing a live writer (each follower caught up with the leader's "
        "first sample), not compared figure by figure"
        for key in settled.trailing
    ]
    return [f"{named(key)}: {'; '.join(found)}" for key, found in settled.divergent.items()]


@pytest.mark.runbook("cluster")
def test_replicas_hold_the_same_data(
    nats_cluster: Cluster, jsz_details: dict[str, Any], verify_state: RunState
) -> None:
    """`nats server stream-check`: every stream's replicas report the same first and last
    sequence, messages and bytes; sampled again for up to 2 s while they differ (live writes)."""
    if not jsz_details:
        pytest.fail("not compared: no node's monitor port answers", pytrace=False)
    problems = compare_replicas(verify_state, nats_cluster, first=jsz_details)
    assert not problems, "replicas differ in every sample: " + " | ".join(problems)


def _stream_details(state: RunState, cluster: Cluster, details: dict[str, Any]) -> list[dict[str, Any]]:
    """Every stream as its own leader reports it (only the leader knows whether its replicas are
    current); a stream without a leader as any node reports it."""
    by_name: dict[str, dict[str, Any]] = {}
    for node in cluster.nodes:
        detail = details.get(node.host)
        if detail is None:
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
