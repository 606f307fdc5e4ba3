"""A cluster deployed before TLS and logins (plaintext, anonymous, streams in the global account),
as production runs today: site.yml refuses to switch it without being asked and changes nothing;
with nats_server_tls_cold_switch=true it switches, and the streams come along into the
application account with every message."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nats
import pytest
from nats.js.api import StorageType, StreamConfig

from tests.helpers import LAB_INVENTORY, delete_stream, failed_checks, nats_verify, on, run_playbook, wait_healthy
from verify.client import connect_tls_or_nothing
from verify.inventory import Cluster, Node

pytestmark = pytest.mark.lab

STREAM = "LAB_PRE_TLS_EVENTS"
MESSAGES = 50
SWITCH = ("-e", "nats_server_tls_cold_switch=true")


def plaintext_config(cluster: Cluster, node: Node) -> str:
    """The config this project deployed before TLS and logins."""
    routes = ", ".join(f'"nats-route://{n.address}:6222"' for n in cluster.nodes if n is not node)
    return f"""server_name: "{node.server_name}"
listen: "{node.address}:4222"
http: "{node.address}:8222"
pid_file: "/run/nats-server/nats-server.pid"
lame_duck_duration: "30s"
lame_duck_grace_period: "10s"
cluster {{ name: "phx-cluster", listen: "{node.address}:6222", routes: [ {routes} ] }}
jetstream {{ store_dir: "{node["nats_server_jetstream_store_dir"]}", domain: "dgx-phx",
  max_memory_store: 1GB, max_file_store: 16GB }}
"""


def plain_health(node: Node) -> int:
    try:
        with urllib.request.urlopen(f"http://{node.address}:8222/healthz", timeout=2) as reply:
            return int(reply.status)
    except OSError:
        return -1


def plain_urls(cluster: Cluster) -> list[str]:
    return [f"nats://{n.address}:4222" for n in cluster.nodes]


def run_everywhere(cluster: Cluster, command: str) -> None:
    with ThreadPoolExecutor(len(cluster.nodes)) as pool:
        list(pool.map(lambda node: on(node.host, command), cluster.nodes))


@pytest.fixture
def plaintext_cluster(deployed_lab: Cluster) -> Iterator[Cluster]:
    """The lab turned back into a pre-TLS cluster (cold: all killed, all started), with a stream
    of MESSAGES events in the global account. Afterwards the lab is switched back regardless."""
    wait_healthy(deployed_lab)
    for node in deployed_lab.nodes:
        on(node.host, f"cat > /etc/nats-server/nats-server.conf <<'EOF'\n{plaintext_config(deployed_lab, node)}EOF")
    run_everywhere(deployed_lab, "systemctl kill --signal=SIGKILL nats-server; sleep 1; systemctl start nats-server")
    deadline = time.monotonic() + 90
    while not all(plain_health(n) == 200 for n in deployed_lab.nodes):
        assert time.monotonic() < deadline, "the plaintext cluster did not become healthy"
        time.sleep(1)

    async def fill() -> None:
        nc = await nats.connect(plain_urls(deployed_lab), connect_timeout=3)
        js = nc.jetstream(timeout=10)
        await js.add_stream(StreamConfig(name=STREAM, subjects=["pretls.>"], storage=StorageType.FILE, num_replicas=3))
        for n in range(MESSAGES):
            await js.publish(f"pretls.{n}", json.dumps({"n": n}).encode())
        await nc.close()

    asyncio.run(fill())
    try:
        yield deployed_lab
    finally:
        if any(plain_health(n) == 200 for n in deployed_lab.nodes):  # the test stopped half way
            result = run_playbook("site.yml", LAB_INVENTORY, *SWITCH, timeout=900)
            assert result.returncode == 0, result.stdout[-4000:]
        wait_healthy(deployed_lab)

        delete_stream(deployed_lab, STREAM)


def test_a_plaintext_cluster_is_switched_only_when_asked_and_keeps_its_streams(
    plaintext_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = plaintext_cluster
    pids = {n.host: on(n.host, "systemctl show -p MainPID --value nats-server").strip() for n in cluster.nodes}
    refused = run_playbook("site.yml", LAB_INVENTORY, timeout=600)
    output = " ".join((refused.stdout + refused.stderr).split())
    assert refused.returncode != 0
    assert "runs without TLS and logins" in output and "nats_server_tls_cold_switch=true" in output, output[-3000:]
    # Untouched: the same processes, still plaintext and healthy, the old config still on disk.
    assert {n.host: on(n.host, "systemctl show -p MainPID --value nats-server").strip() for n in cluster.nodes} == pids
    assert all(plain_health(n) == 200 for n in cluster.nodes)
    assert "tls {" not in on("nats-1", "cat /etc/nats-server/nats-server.conf")

    switched = run_playbook("site.yml", LAB_INVENTORY, *SWITCH, timeout=900)
    assert switched.returncode == 0, switched.stdout[-4000:]
    wait_healthy(cluster)
    assert all(plain_health(n) != 200 for n in cluster.nodes), "a monitor still answers plain http"

    async def carried_over() -> tuple[int, int, int]:
        nc = await connect_tls_or_nothing(cluster.client_urls, connect_timeout=3, **cluster.login())
        info = await nc.jetstream(timeout=10).stream_info(STREAM)
        await nc.close()
        return info.state.messages, info.state.first_seq, info.state.last_seq

    assert asyncio.run(carried_over()) == (MESSAGES, 1, MESSAGES)
    code, report, _, output = nats_verify(tmp_path)
    assert code == 0, failed_checks(report) or output[-3000:]
