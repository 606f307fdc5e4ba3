"""playbooks/remediate/purge-consumers.yml on the lab: 200 leaked consumers next to 3 live
durables on an R3 stream. The dry run changes nothing, --check deletes nothing, the apply removes
exactly the 200 and keeps the live ones, and a re-run reports no change."""

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
from verify.inventory import Cluster
from verify.load import connect

pytestmark = pytest.mark.lab

PLAYBOOK = "remediate/purge-consumers.yml"
STREAM = "LAB_CONSUMERS"
LEAKED = [f"cim-test-{n:03d}" for n in range(200)]
LIVE = ["projector-pending", "projector-unacked", "projector-active"]
STALE_AFTER = 8
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
        # Leaked: durables whose test run ended without deleting them (nothing to deliver). Each R3
        # consumer forms its own raft group (~0.25 s): created a batch at a time, not one by one.
        for batch in range(0, len(LEAKED), LEAK_BATCH):
            await asyncio.gather(
                *(
                    js.add_consumer(
                        STREAM,
                        ConsumerConfig(
                            durable_name=name, filter_subject="labconsumers.none", ack_policy=AckPolicy.EXPLICIT
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
    nc = await connect(cluster, "purge-test")
    try:
        js = nc.jetstream(timeout=10)
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
        del js
        return names
    finally:
        await nc.close()


def module_result(json_stdout: str) -> dict[str, Any]:
    for play in json.loads(json_stdout)["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"].endswith("Consumers | find stale consumers across the streams"):
                return dict(next(iter(task["hosts"].values())))
    raise AssertionError("the consumers task did not run")


def purge(*extra: str) -> dict[str, Any]:
    result = run_playbook(
        PLAYBOOK, LAB_INVENTORY, "-e", f"jetstream_streams_purge_stale_after={STALE_AFTER}s", *extra, json_output=True
    )
    assert result.returncode == 0, result.stdout[-4000:]
    return module_result(result.stdout)


@pytest.fixture
def leaked_consumers(deployed_lab: Cluster) -> Iterator[Cluster]:
    wait_healthy(deployed_lab)
    delete_stream(deployed_lab, STREAM)
    asyncio.run(create_consumers(deployed_lab))
    time.sleep(STALE_AFTER + 1)
    stop = threading.Event()
    busy = threading.Thread(target=asyncio.run, args=(make_live_ones_busy(deployed_lab, stop),))
    busy.start()
    time.sleep(2)
    yield deployed_lab
    stop.set()
    busy.join(30)
    delete_stream(deployed_lab, STREAM)


def test_report_then_delete_exactly_the_leaked_consumers(leaked_consumers: Cluster) -> None:
    cluster = leaked_consumers
    everything = set(LEAKED) | set(LIVE)
    assert asyncio.run(consumer_names(cluster)) == everything

    report = purge()
    assert report["changed"] is False and report["deleted"] == []
    assert sorted(report["stale"]) == sorted(f"{STREAM}/{name}" for name in LEAKED)
    reasons = {c["name"]: c["reason"] for c in report["consumers"] if c["stream"] == STREAM}
    assert "pending" in reasons["projector-pending"] and "awaiting ack" in reasons["projector-unacked"], reasons
    assert "active" in reasons["projector-active"], reasons
    assert asyncio.run(consumer_names(cluster)) == everything

    checked = purge("-e", "jetstream_streams_purge_delete=true", "--check")
    assert len(checked["deleted"]) == len(LEAKED)
    assert asyncio.run(consumer_names(cluster)) == everything, "--check deleted consumers"

    started = time.monotonic()
    applied = purge("-e", "jetstream_streams_purge_delete=true")
    elapsed = time.monotonic() - started
    assert applied["changed"] is True
    assert sorted(applied["deleted"]) == sorted(f"{STREAM}/{name}" for name in LEAKED)
    assert asyncio.run(consumer_names(cluster)) == set(LIVE)

    again = purge("-e", "jetstream_streams_purge_delete=true")
    assert again["changed"] is False and again["deleted"] == [] and again["stale"] == []
    print(f"purge-consumers: {len(applied['deleted'])} of {len(everything)} deleted in {elapsed:.1f} s (playbook)")
