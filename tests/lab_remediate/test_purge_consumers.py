"""playbooks/remediate/purge-consumers.yml on the lab: 900 leaked R1 consumers spread over all three
servers next to 3 live durables on an R3 stream. A clustered consumer list is assembled by the meta
leader from the servers hosting the consumers and leaves out those that do not answer in time (one
listing of 1024 returned 623, and clearing took three runs); the module takes the names from the
meta layer and asks for the rest one by one. --check deletes nothing and sees every consumer, ONE
delete run removes all 900 and keeps the live ones, and a re-run reports no change."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from tests.helpers import LAB_INVENTORY, delete_stream, run_playbook, wait_healthy
from verify import monitor
from verify.inventory import Cluster
from verify.load import connect

pytestmark = pytest.mark.lab

PLAYBOOK = "remediate/purge-consumers.yml"
STREAM = "LAB_CONSUMERS"
# Below the server's default per-stream limit (1000) as well as the APP account's (4096).
LEAKED = [f"cim-test-{n:03d}" for n in range(900)]
LIVE = ["projector-pending", "projector-unacked", "projector-active"]
STALE_AFTER = 30  # the module's minimum
# Creation is serialised by the meta leader: requests a batch at a time, not one by one.
LEAK_BATCH = 20


async def create_consumers(cluster: Cluster) -> None:
    nc = await connect(cluster, "purge-test")
    try:
        js = nc.jetstream(timeout=10)
        await js.add_stream(
            StreamConfig(name=STREAM, subjects=["labconsumers.>"], storage=StorageType.FILE, num_replicas=3)
        )
        for subject in ("pending", "unacked", "active"):
            for n in range(3):
                await js.publish(f"labconsumers.{subject}", f"{subject}-{n}".encode())
        # Leaked: R1 durables whose test run ended without deleting them (nothing to deliver). The
        # meta leader places each on one of the stream's three servers.
        for batch in range(0, len(LEAKED), LEAK_BATCH):
            await asyncio.gather(
                *(
                    js.add_consumer(
                        STREAM,
                        ConsumerConfig(
                            durable_name=name,
                            filter_subject="labconsumers.none",
                            ack_policy=AckPolicy.EXPLICIT,
                            num_replicas=1,
                        ),
                    )
                    for name in LEAKED[batch : batch + LEAK_BATCH]
                )
            )
        for name in LIVE:
            await js.add_consumer(
                STREAM,
                ConsumerConfig(
                    durable_name=name,
                    filter_subject=f"labconsumers.{name.split('-')[1]}",
                    ack_policy=AckPolicy.EXPLICIT,
                ),
            )
    finally:
        await nc.close()


def hosted_leaks(cluster: Cluster) -> dict[str, set[str]]:
    """The leaked consumers each server hosts, from its own monitor (/jsz answers for one server)."""
    hosted = {}
    for node in cluster.nodes:
        jsz = monitor.get_json(node.monitor_url, "/jsz?accounts=true&streams=true&consumers=true", timeout=15)
        hosted[node.host] = {
            consumer["name"]
            for account in jsz.get("account_details") or []
            for stream in account.get("stream_detail") or []
            if stream.get("name") == STREAM
            for consumer in stream.get("consumer_detail") or []
            if consumer["name"].startswith("cim-test-")
        }
    return hosted


def assert_spread_over_every_server(cluster: Cluster) -> dict[str, int]:
    """Each leaked consumer on exactly one server, and every server hosting some. Waits a little
    for servers still applying their assignments."""
    deadline = time.monotonic() + 20
    while True:
        hosted = hosted_leaks(cluster)
        placed = [name for names in hosted.values() for name in names]
        if sorted(placed) == LEAKED or time.monotonic() > deadline:
            break
        time.sleep(1)
    counts = {host: len(names) for host, names in hosted.items()}
    assert sorted(placed) == LEAKED, f"leaked consumers by server: {counts} (want {len(LEAKED)}, each once)"
    assert len(hosted) == 3 and all(counts.values()), f"every server should host some: {counts}"
    return counts


async def make_live_ones_busy(cluster: Cluster, stop: threading.Event) -> None:
    """After the leaked ones have idled past the threshold: one is left with messages pending, one
    holds unacked deliveries, one keeps taking and acking new messages (recent activity) until
    `stop`."""
    nc = await connect(cluster, "purge-test")
    try:
        js = nc.jetstream(timeout=10)
        unacked = await js.pull_subscribe_bind(durable="projector-unacked", stream=STREAM)
        await unacked.fetch(2, timeout=5)
        active = await js.pull_subscribe_bind(durable="projector-active", stream=STREAM)
        while not stop.is_set():
            await js.publish("labconsumers.active", b"tick")
            for msg in await active.fetch(10, timeout=5):
                await msg.ack_sync()
            await asyncio.sleep(1)
    finally:
        await nc.close()


async def consumer_names(cluster: Cluster) -> set[str]:
    """From CONSUMER.NAMES: the meta layer's assignments, complete (paged, 1024 a page)."""
    nc = await connect(cluster, "purge-test")
    try:
        names: set[str] = set()
        offset = 0
        while True:
            reply = await nc.request(
                f"$JS.API.CONSUMER.NAMES.{STREAM}", json.dumps({"offset": offset}).encode(), timeout=10
            )
            page = json.loads(reply.data)
            names |= set(page.get("consumers") or [])
            offset += len(page.get("consumers") or [])
            if not page.get("consumers") or offset >= page["total"]:
                break
        return names
    finally:
        await nc.close()


def module_result(json_stdout: str) -> dict[str, Any]:
    for play in json.loads(json_stdout)["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"].endswith("Consumers | find stale consumers across the streams"):
                return dict(next(iter(task["hosts"].values())))
    raise AssertionError("the consumers task did not run")


def purge(*extra: str) -> tuple[dict[str, Any], float]:
    """One playbook run; the module's result and the run's seconds."""
    started = time.monotonic()
    result = run_playbook(
        PLAYBOOK, LAB_INVENTORY, "-e", f"jetstream_streams_purge_stale_after={STALE_AFTER}s", *extra, json_output=True
    )
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:]
    return module_result(result.stdout), took


@pytest.fixture
def leaked_consumers(deployed_lab: Cluster) -> Iterator[Cluster]:
    wait_healthy(deployed_lab)
    delete_stream(deployed_lab, STREAM)
    started = time.monotonic()
    asyncio.run(create_consumers(deployed_lab))
    created = time.monotonic()
    placement = assert_spread_over_every_server(deployed_lab)
    print(
        f"purge-consumers: {len(LEAKED) + len(LIVE)} consumers created in {created - started:.1f} s; "
        f"leaked ones by server {placement}"
    )
    # The last leak idles past stale_after (the server's clock; a second of margin).
    time.sleep(max(0.0, created + STALE_AFTER + 1 - time.monotonic()))
    stop = threading.Event()
    busy = threading.Thread(target=asyncio.run, args=(make_live_ones_busy(deployed_lab, stop),))
    busy.start()
    time.sleep(2)
    yield deployed_lab
    stop.set()
    busy.join(30)
    delete_stream(deployed_lab, STREAM)


def test_one_run_deletes_every_leaked_consumer_across_the_servers(leaked_consumers: Cluster) -> None:
    cluster = leaked_consumers
    everything = set(LEAKED) | set(LIVE)
    assert asyncio.run(consumer_names(cluster)) == everything
    leaked = sorted(f"{STREAM}/{name}" for name in LEAKED)

    # --check: every consumer seen (none left out), exactly the leaked ones stale, nothing deleted.
    checked, _ = purge("-e", "jetstream_streams_purge_delete=true", "--check")
    counts = checked["counts"]
    assert counts["unseen"] == 0 and checked["unseen"] == [], checked["msg"]
    assert counts["names"] == counts["seen"] >= len(everything), counts
    assert sorted(checked["stale"]) == leaked and sorted(checked["deleted"]) == leaked
    reasons = {c["name"]: c["reason"] for c in checked["consumers"] if c["stream"] == STREAM}
    assert "pending" in reasons["projector-pending"] and "awaiting ack" in reasons["projector-unacked"], reasons
    assert "active" in reasons["projector-active"], reasons
    assert asyncio.run(consumer_names(cluster)) == everything, "--check deleted consumers"

    # One run clears them all.
    applied, took = purge("-e", "jetstream_streams_purge_delete=true")
    assert applied["changed"] is True
    assert applied["counts"]["unseen"] == 0 and applied["counts"]["failed"] == 0, applied["msg"]
    assert sorted(applied["deleted"]) == leaked and applied["counts"]["deleted"] == len(LEAKED), applied["msg"]
    assert asyncio.run(consumer_names(cluster)) == set(LIVE)

    again, _ = purge("-e", "jetstream_streams_purge_delete=true")
    assert again["changed"] is False and again["deleted"] == [] and again["stale"] == []
    assert again["counts"]["unseen"] == 0
    print(
        f"purge-consumers: {len(applied['deleted'])} of {applied['counts']['names']} deleted in one run, "
        f"{took:.1f} s (playbook); the list returned {applied['counts']['listed']} of {applied['counts']['seen']} seen "
        f"(--check: {counts['listed']}); {applied['msg']}"
    )
