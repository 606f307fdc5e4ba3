"""verify's limit, consumer and replica checks (verify/checks/test_cluster.py) against real
nats-servers on loopback: one server whose accounts carry JetStream limits, and a 3-node cluster.
The check functions are called as pytest would, with the view and /jsz they read built here."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, StorageType, StreamConfig

from tests.local_nats import LocalServer, local_server, local_trio, wait_healthy
from verify.checks import test_cluster as checks
from verify.inventory import Cluster, Node
from verify.limits import human_bytes
from verify.plugin import RUNBOOKS, RunState, monitor_json

SMALL_ACCOUNT_CONSUMERS = 10
# The check must add well under a second to a run: one view, the /jsz already fetched.
CHECK_BUDGET_SECONDS = 1.0


@dataclass(frozen=True)
class LocalNode(Node):
    """A node of a loopback server: plain http monitor, plain client port."""

    client_port: int = 0
    monitor_port: int = 0

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    @property
    def client_url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"


def local_node(host: str, server_name: str, client: int, http: int) -> LocalNode:
    return LocalNode(host, "127.0.0.1", {"nats_server_name": server_name}, {}, client_port=client, monitor_port=http)


def local_cluster(*nodes: LocalNode) -> Cluster:
    """What the checks read of a Cluster: its nodes."""
    return cast(Cluster, SimpleNamespace(nodes=nodes, client_urls=[n.client_url for n in nodes]))


ACCOUNTS = f"""
accounts {{
  APP {{
    jetstream: {{ max_memory: 10MB, max_file: 1MB, max_streams: 5, max_consumers: {SMALL_ACCOUNT_CONSUMERS} }}
    users: [{{ user: app, password: app }}]
  }}
  FREE {{ jetstream: enabled, users: [{{ user: free, password: free }}] }}
  SYS {{ users: [{{ user: sys, password: sys }}] }}
}}
system_account: SYS
"""


# The trio's servers by host, for the test that stops one.
TRIO_SERVERS: dict[str, LocalServer] = {}


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    """One server: account APP with small limits, FREE without; the server's file store 2 MiB."""
    workdir = tmp_path_factory.mktemp("single")

    def config(client: int, http: int) -> str:
        return (
            f'server_name: "solo"\nlisten: "127.0.0.1:{client}"\nhttp: "127.0.0.1:{http}"\n'
            f'jetstream {{ store_dir: "{workdir}/store", max_memory_store: 64MB, max_file_store: 2MB }}\n' + ACCOUNTS
        )

    with local_server(workdir, config, seconds=20) as server:
        yield local_node("solo", "solo", server.client_port, server.http_port)


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalNode, ...]]:
    """A 3-node JetStream cluster on loopback (routes, meta group), nodes nats-1..3 (n1..n3)."""
    workdir = tmp_path_factory.mktemp("trio")
    with local_trio(workdir, "max_memory_store: 64MB, max_file_store: 1GB", ACCOUNTS) as servers:
        nodes = []
        for index, server in enumerate(servers, start=1):
            nodes.append(local_node(f"nats-{index}", f"n{index}", server.client_port, server.http_port))
            TRIO_SERVERS[nodes[-1].host] = server
        yield tuple(nodes)


async def _connect(nodes: tuple[LocalNode, ...] | list[LocalNode], user: str = "app") -> Client:
    return await nats.connect([n.client_url for n in nodes], user=user, password=user, connect_timeout=3)


@pytest.fixture(autouse=True)
def no_stream_left_on_the_trio(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that fails half-way must not leave its streams for the next one to count."""
    yield
    if "trio" not in request.fixturenames:
        return
    if any(server.process.poll() is not None for server in TRIO_SERVERS.values()):
        return  # a test stopped a member for good (the last one): the trio is not used again
    trio = request.getfixturevalue("trio")

    async def clear(js: Any) -> None:
        for name in [s.config.name for s in await js.streams_info()]:
            await js.delete_stream(name)

    js_run(trio, clear)


def replicas_current(nodes: tuple[LocalNode, ...], name: str, within: float = 15.0) -> None:
    """Waits until every replica of `name` is current: a just-created R3 stream's followers can
    trail for a moment on a loaded machine, and these checks would rightly call them lagging."""

    async def current(js: Any) -> bool:
        info = await js.stream_info(name)
        return bool(info.cluster and info.cluster.leader and all(r.current for r in info.cluster.replicas or []))

    deadline = time.monotonic() + within
    while not js_run(nodes, current):
        assert time.monotonic() < deadline, f"{name}: replicas not current within {within:.0f} s"
        time.sleep(0.2)


def view_of(nodes: tuple[LocalNode, ...] | list[LocalNode], user: str = "app") -> checks.JetStreamView:
    async def read() -> checks.JetStreamView:
        nc = await _connect(nodes, user)
        try:
            return await checks.read_jetstream(nc)
        finally:
            await nc.close()

    return asyncio.run(read())


def details_of(state: RunState, nodes: tuple[LocalNode, ...] | list[LocalNode]) -> dict[str, Any]:
    return {n.host: monitor_json(state, n, checks.DETAIL) for n in nodes}


def js_run(nodes: tuple[LocalNode, ...] | list[LocalNode], work: Any, user: str = "app") -> Any:
    """Runs `await work(js)` on a fresh connection. API calls get 15 s: on two busy cores a fresh
    trio's first R3 stream creation took longer than 5 s once (CI, 2026-12-01)."""

    async def go() -> Any:
        nc = await _connect(nodes, user)
        try:
            return await work(nc.jetstream(timeout=15))
        finally:
            await nc.close()

    return asyncio.run(go())


def fail_message(check: Any, *args: Any) -> str:
    """The failure of a check that asserts."""
    with pytest.raises(AssertionError) as failure:
        check(*args)
    return str(failure.value)


def fail_message_outcome(check: Any, *args: Any) -> str:
    """The failure of a check that calls pytest.fail."""
    with pytest.raises(pytest.fail.Exception) as failure:
        check(*args)
    return str(failure.value)


# --- one server: account and stream limits --------------------------------------------------


def stored_size(node: LocalNode, stream: str, user: str = "app") -> int:
    """Bytes one 100-byte message takes in `stream` (measured: the store's own accounting)."""

    async def measure(js: Any) -> int:
        await js.publish(f"{stream.lower()}.x", b"m" * 100)
        info = await js.stream_info(stream)
        await js.purge_stream(stream)
        return int(info.state.bytes)

    return int(js_run([node], measure, user))


def make_stream(node: LocalNode, name: str, user: str = "app", **config: Any) -> None:
    async def create(js: Any) -> None:
        await js.add_stream(StreamConfig(name=name, subjects=[f"{name.lower()}.>"], storage=StorageType.FILE, **config))

    js_run([node], create, user)


def publish(node: LocalNode, subject: str, count: int, size: int = 100, user: str = "app") -> None:
    async def send(js: Any) -> None:
        for _ in range(count):
            await js.publish(subject, b"m" * size)

    js_run([node], send, user)


def delete_stream(node: LocalNode, name: str, user: str = "app") -> None:
    async def delete(js: Any) -> None:
        await js.delete_stream(name)

    js_run([node], delete, user)


def test_stream_at_85_percent_of_max_bytes_warns_and_at_100_fails(single: LocalNode) -> None:
    make_stream(single, "BYTES")
    size = stored_size(single, "BYTES")

    async def limit(js: Any) -> None:
        info = await js.stream_info("BYTES")
        info.config.max_bytes = 20 * size
        await js.update_stream(info.config)

    js_run([single], limit)
    publish(single, "bytes.x", 17)  # 17 of 20 messages' worth: 85%
    state = RunState()
    view = view_of([single])
    assert view.account == "APP"  # from $SYS.REQ.USER.INFO
    checks.test_account_and_stream_limits_not_reached(view, state)
    (warning,) = state.warnings
    figure = f"{human_bytes(17 * size)} of {human_bytes(20 * size)}"
    assert warning.startswith(f"stream BYTES: max_bytes at 85% ({figure}; discard old"), warning
    assert warning.endswith(f"; next: {RUNBOOKS['capacity']}")
    assert "docs/storage.md" in warning

    publish(single, "bytes.x", 5)  # discard old: the stream stays at exactly its limit
    state = RunState()
    message = fail_message(checks.test_account_and_stream_limits_not_reached, view_of([single]), state)
    figure = f"{human_bytes(20 * size)} of {human_bytes(20 * size)}"
    assert f"stream BYTES: max_bytes reached 100% ({figure}" in message, message
    assert state.warnings == []
    delete_stream(single, "BYTES")


def test_stream_max_msgs_with_discard_new(single: LocalNode) -> None:
    make_stream(single, "COUNTED", max_msgs=10, discard="new")
    publish(single, "counted.x", 8)
    state = RunState()
    checks.test_account_and_stream_limits_not_reached(view_of([single]), state)
    assert [w.split(";")[0] for w in state.warnings] == ["stream COUNTED: max_msgs at 80% (8 of 10"]
    assert "discard new: at the limit publishes are refused" in state.warnings[0]
    publish(single, "counted.x", 2)
    message = fail_message(checks.test_account_and_stream_limits_not_reached, view_of([single]), RunState())
    assert "stream COUNTED: max_msgs reached 100% (10 of 10" in message
    delete_stream(single, "COUNTED")


def test_account_consumers_at_80_percent_warn_and_count_per_stream(single: LocalNode) -> None:
    make_stream(single, "READ")
    make_stream(single, "ALSO")

    async def consumers(js: Any) -> None:
        for n in range(8):
            await js.add_consumer("READ", ConsumerConfig(durable_name=f"r{n}"))
        for n in range(7):
            await js.add_consumer("ALSO", ConsumerConfig(durable_name=f"a{n}"))

    js_run([single], consumers)
    state = RunState()
    view = view_of([single])
    details = details_of(state, [single])
    checks.test_consumer_limits_not_reached(view, details, state)
    # 15 in the account, over its max_consumers 10: the server counts per stream, and so does verify.
    (warning,) = state.warnings
    assert warning.startswith(
        "stream READ: consumers vs the account's max_consumers (counted per stream) at 80% (8 of 10"
    )
    assert warning.endswith(f"; next: {RUNBOOKS['consumers']}")
    assert "docs/runbooks/purge-consumers.md" in warning
    checks.test_account_jetstream_usage(view, details, state)
    assert state.report == [
        "account APP: consumers 15, fullest stream READ 8 of 10, streams 2 of 5, memory 0 B of 10.0 MiB, "
        "storage 0 B of 1.0 MiB"
    ]

    async def more(js: Any) -> None:
        for n in range(8, SMALL_ACCOUNT_CONSUMERS):
            await js.add_consumer("READ", ConsumerConfig(durable_name=f"r{n}"))
        with pytest.raises(nats.js.errors.BadRequestError, match="maximum consumers limit reached"):
            await js.add_consumer("READ", ConsumerConfig(durable_name="one-too-many"))

    js_run([single], more)
    message = fail_message(checks.test_consumer_limits_not_reached, view_of([single]), details, RunState())
    assert (
        "stream READ: consumers vs the account's max_consumers (counted per stream) reached 100% (10 of 10" in message
    )
    assert "ALSO" not in message
    delete_stream(single, "READ")
    delete_stream(single, "ALSO")


def test_account_streams_limit(single: LocalNode) -> None:
    for n in range(4):
        make_stream(single, f"MANY{n}")
    state = RunState()
    checks.test_account_and_stream_limits_not_reached(view_of([single]), state)
    assert [w.split(" (")[0] for w in state.warnings] == ["account APP: max_streams at 80%"]
    make_stream(single, "MANY4")
    message = fail_message(checks.test_account_and_stream_limits_not_reached, view_of([single]), RunState())
    assert message.startswith("account APP: max_streams reached 100% (5 of 5")
    for n in range(5):
        delete_stream(single, f"MANY{n}")


def test_server_file_store_at_80_percent_warns(single: LocalNode) -> None:
    """The server's own max_file_store (2 MiB here), filled from an account without limits."""
    make_stream(single, "BULK", user="free")
    publish(single, "bulk.x", 17, size=100_000, user="free")
    state = RunState()
    checks.test_server_store_limits_not_reached(single, details_of(state, [single]), state)
    (warning,) = state.warnings
    assert warning.startswith("server solo: max_file_store at 8")
    assert "MiB of 2.0 MiB" in warning
    assert warning.endswith(f"; next: {RUNBOOKS['capacity']}")
    delete_stream(single, "BULK", user="free")


def test_server_default_consumer_limit_binds_an_unlimited_stream(single: LocalNode) -> None:
    """In an account without limits the server's default_max_consumers (1000 on 2.15.1) binds a
    stream without its own max_consumers."""
    state = RunState()
    details = details_of(state, [single])
    assert checks.default_max_consumers(details) == 1000
    make_stream(single, "FREE_READ", user="free")

    async def consumers(js: Any) -> None:
        for n in range(800):
            await js.add_consumer("FREE_READ", ConsumerConfig(durable_name=f"f{n}"))

    js_run([single], consumers, "free")
    view = view_of([single], user="free")
    assert view.account == "FREE"
    checks.test_consumer_limits_not_reached(view, details, state)
    (warning,) = state.warnings
    assert warning.startswith("stream FREE_READ: consumers vs the server's default_max_consumers at 80% (800 of 1000")
    delete_stream(single, "FREE_READ", user="free")


def test_view_failure_fails_the_checks_with_its_words() -> None:
    view = checks.JetStreamView(
        "APP", error="account info: JetStreamError: $JS.API.INFO: JetStream not enabled (10039)"
    )
    message = fail_message_outcome(checks.test_account_jetstream_usage, view, {}, RunState())
    assert "JetStream not enabled (10039)" in message
    assert view.consumers("ANY").startswith("? (account info")


# --- three nodes: cluster-wide consumer counts, replicas ------------------------------------


def test_consumer_count_is_cluster_wide(trio: tuple[LocalNode, ...]) -> None:
    """R1 consumers of an R3 stream live on different servers: a node's /jsz counts only its own,
    STREAM.INFO (the stream leader) counts them all, as the server's limit does."""

    async def world(js: Any) -> None:
        await js.add_stream(StreamConfig(name="WIDE", subjects=["wide.>"], num_replicas=3))
        for n in range(9):
            await js.add_consumer("WIDE", ConsumerConfig(durable_name=f"w{n}", num_replicas=1))

    js_run(trio, world)
    replicas_current(trio, "WIDE")
    state = RunState()
    started = time.monotonic()
    view = view_of(trio)
    details = details_of(state, trio)
    checks.test_consumer_limits_not_reached(view, details, state)
    elapsed = time.monotonic() - started
    assert view.streams["WIDE"]["state"]["consumer_count"] == 9
    local_counts = {
        host: next(
            s["state"]["consumer_count"]
            for a in jsz["account_details"]
            if a["name"] == "APP"
            for s in a["stream_detail"]
            if s["name"] == "WIDE"
        )
        for host, jsz in details.items()
    }
    print(f"WIDE consumers: STREAM.INFO 9, each node's /jsz {local_counts}")
    assert sum(local_counts.values()) == 9  # each node counts the R1 consumers it hosts, no more
    # 9 of 10: over 80% of the account's limit, which no single node's /jsz may show.
    (warning,) = state.warnings
    assert "stream WIDE: consumers vs the account's max_consumers (counted per stream) at 90% (9 of 10" in warning
    assert elapsed < CHECK_BUDGET_SECONDS, elapsed
    # The build-up check counts the same way (its threshold, --max-consumers-per-stream, set to 5).
    request = cast(pytest.FixtureRequest, SimpleNamespace(config=SimpleNamespace(getoption=lambda _: 5)))
    message = fail_message(checks.test_no_stale_consumer_build_up, view, state, request)
    assert message.startswith("consumers per stream above 5: {'WIDE': 9}"), message
    checks.test_streams_have_leaders_and_current_replicas(local_cluster(*trio), details, view, state)
    assert any(line.startswith("stream WIDE: replicas 3") and line.endswith("consumers 9") for line in state.report)
    js_run(trio, lambda js: js.delete_stream("WIDE"))


def test_replicas_agree(trio: tuple[LocalNode, ...]) -> None:
    async def world(js: Any) -> None:
        await js.add_stream(StreamConfig(name="SAME", subjects=["same.>"], num_replicas=3))
        await js.add_stream(StreamConfig(name="ONE", subjects=["one.>"], num_replicas=1))
        for n in range(50):
            await js.publish("same.x", str(n).encode())
            await js.publish("one.x", b"1")

    js_run(trio, world)
    wait_healthy(list(TRIO_SERVERS.values()), seconds=20)
    state = RunState()
    started = time.monotonic()
    checks.test_replicas_hold_the_same_data(local_cluster(*trio), details_of(state, trio), state)
    assert time.monotonic() - started < CHECK_BUDGET_SECONDS
    # SAME is compared; ONE (a single copy) is not.
    assert state.report == ["replicas: 1 streams compared, 0 differ (1 sample in 0.0 s)"]
    js_run(trio, lambda js: js.delete_stream("ONE"))


def test_replicas_under_live_publishing_pass(trio: tuple[LocalNode, ...]) -> None:
    """Publishing as fast as one client can (into an R3 stream of the unlimited account) while
    the check samples afresh, five times: the followers trail by milliseconds, and the check must
    not call that divergence."""
    js_run(trio, lambda js: js.add_stream(StreamConfig(name="LIVE", subjects=["live.>"], num_replicas=3)), "free")
    stop, published, failed = threading.Event(), [0], []

    async def writer() -> None:
        nc = await _connect(trio, "free")
        js = nc.jetstream(timeout=5)
        try:
            while not stop.is_set():
                await asyncio.gather(*(js.publish("live.x", b"x" * 64) for _ in range(20)))
                published[0] += 20
        except Exception as error:
            failed.append(error)
        finally:
            await nc.close()

    thread = threading.Thread(target=lambda: asyncio.run(writer()), daemon=True)
    thread.start()
    rounds = []
    try:
        time.sleep(0.3)
        for _ in range(5):
            state, before = RunState(), published[0]
            problems = checks.compare_replicas(state, local_cluster(*trio))
            rounds.append((problems, published[0] - before, state.report))
    finally:
        stop.set()
        thread.join(10)
    for _, during, report in rounds:
        print(f"{during} published during the check; {report}")
    assert failed == []
    assert published[0] > 500 and sum(during for _, during, _ in rounds) > 0, rounds  # it wrote throughout
    assert [problems for problems, _, _ in rounds] == [[]] * 5
    assert all(" 0 differ" in report[0] for _, _, report in rounds)


def test_a_silent_node_is_left_out_with_a_note(trio: tuple[LocalNode, ...]) -> None:
    """Last in this module: it stops nats-3 for good. Its monitor does not answer: the other two
    are compared, the report names it, the check does not fail for it."""

    async def world(js: Any) -> None:
        await js.add_stream(StreamConfig(name="SAME", subjects=["same.>"], num_replicas=3))
        for n in range(20):
            await js.publish("same.x", str(n).encode())

    async def free_world(js: Any) -> None:
        await js.add_stream(StreamConfig(name="LIVE", subjects=["live.>"], num_replicas=3))
        await js.publish("live.x", b"1")

    js_run(trio, world)
    js_run(trio, free_world, user="free")
    replicas_current(trio, "SAME")
    TRIO_SERVERS[trio[2].host].process.terminate()
    TRIO_SERVERS[trio[2].host].process.wait(10)
    state = RunState()
    details = {}
    for node in trio:  # as the jsz_details fixture fetches: a node that does not answer is left out
        try:
            details[node.host] = monitor_json(state, node, checks.DETAIL)
        except pytest.fail.Exception:
            continue
    assert set(details) == {"nats-1", "nats-2"}
    checks.test_replicas_hold_the_same_data(local_cluster(*trio), details, state)
    # SAME (APP) and LIVE (FREE), each on the two nodes left.
    assert state.report[0].startswith("replicas: 2 streams compared, 0 differ")
    assert state.report[0].endswith("; not compared on nats-3 (not answering)")
    assert "monitor:nats-3" in state.unreachable
