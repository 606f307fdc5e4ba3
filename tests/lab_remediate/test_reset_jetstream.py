"""playbooks/remediate/reset-jetstream.yml on the lab.

Node mode: under an R3 publishing load one node's whole JetStream tree is moved aside; it re-syncs
from its peers, every replica ends equal and no acked message is lost. Cluster mode: with the
meta state corrupted on every node, the streams are snapshotted, every store moved aside, the
cluster cold-started and the snapshots restored, message for message. Unclear requests, a wrong
confirmation, --check and a cluster that cannot spare the node change nothing.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import StorageType, StreamConfig

from tests.helpers import (
    CLUSTER_RESET,
    LAB_INVENTORY,
    assert_nothing_lost,
    delete_stream,
    nats_lab,
    nats_verify,
    on,
    run_playbook,
    service_identities,
    service_identity,
    wait_healthy,
)
from verify import monitor
from verify.inventory import Cluster
from verify.load import BackgroundPublisher, connect

pytestmark = pytest.mark.lab

PLAYBOOK = "remediate/reset-jetstream.yml"
TARGET = "nats-2"
STREAM = "LAB_RESET"


def backups(host: str) -> list[str]:
    return on(host, f"ls /mnt/cimstor-jetstream/{host}").split()


def replica_states(cluster: Cluster, stream: str) -> dict[str, tuple[int, int, int, int]]:
    """Each node's own replica of STREAM: messages, bytes, first and last sequence."""
    states = {}
    for node in cluster.nodes:
        jsz = monitor.get_json(node.monitor_url, "/jsz?streams=true")
        for account in jsz.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail["name"] == stream:
                    s = detail["state"]
                    states[node.host] = (s["messages"], s["bytes"], s["first_seq"], s["last_seq"])
    return states


def test_unclear_requests_change_nothing(healthy_lab: Cluster) -> None:
    before = service_identities(healthy_lab)
    for args, message in (
        ([], "Node mode needs the node to reset: -e reset_jetstream_node=<one of nats-1, nats-2, nats-3>"),
        (["-e", "reset_jetstream_node=nats-9"], "(got: nats-9)"),
        (["-e", "reset_jetstream_scope=everything"], "reset_jetstream_scope must be node or cluster"),
        (
            ["-e", f"reset_jetstream_node={TARGET}", "-e", "reset_jetstream_confirm=nats-3"],
            "Confirmation did not match",
        ),
        (
            ["-e", "reset_jetstream_scope=cluster", "-e", "reset_jetstream_confirm=nats-2"],
            "did not match 'phx-cluster'",
        ),
    ):
        result = run_playbook(PLAYBOOK, LAB_INVENTORY, *args)
        assert result.returncode != 0
        assert message in " ".join(result.stdout.split()), result.stdout[-2000:]
    assert service_identities(healthy_lab) == before
    assert "jetstream" in backups(TARGET)


def test_check_mode_changes_nothing(healthy_lab: Cluster) -> None:
    before, stored = service_identities(healthy_lab), backups(TARGET)
    result = run_playbook(
        PLAYBOOK,
        LAB_INVENTORY,
        "--check",
        "-e",
        f"reset_jetstream_node={TARGET}",
        "-e",
        f"reset_jetstream_confirm={TARGET}",
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert service_identities(healthy_lab) == before and backups(TARGET) == stored


def test_node_mode_refuses_when_the_others_cannot_hold_quorum(healthy_lab: Cluster) -> None:
    before, stored = service_identity(TARGET), backups(TARGET)
    assert nats_lab("fault", "stop", "nats-3").returncode == 0
    result = run_playbook(
        PLAYBOOK, LAB_INVENTORY, "-e", f"reset_jetstream_node={TARGET}", "-e", f"reset_jetstream_confirm={TARGET}"
    )
    assert result.returncode != 0
    output = " ".join(result.stdout.split())
    # Other members may be listed too while their R3 replicas re-elect without nats-3.
    assert f"Refusing to take {TARGET} down" in output, output[-3000:]
    assert re.search(r"unhealthy: [^;]*nats-3", output), output[-3000:]
    assert service_identity(TARGET) == before and backups(TARGET) == stored


def test_node_reset_under_load_resyncs_every_replica(healthy_lab: Cluster) -> None:
    stored = backups(TARGET)
    with BackgroundPublisher(healthy_lab, stream="LAB_PROBE_RESET", subject="labprobe.reset") as publisher:
        time.sleep(2)
        started = time.monotonic()
        result = run_playbook(
            PLAYBOOK, LAB_INVENTORY, "-e", f"reset_jetstream_node={TARGET}", "-e", f"reset_jetstream_confirm={TARGET}"
        )
        elapsed = time.monotonic() - started
        time.sleep(1)
    assert result.returncode == 0, result.stdout[-4000:]
    new_backups = sorted(set(backups(TARGET)) - set(stored))
    assert len(new_backups) == 1 and new_backups[0].startswith("jetstream.reset-"), backups(TARGET)
    # The publisher has stopped: every node's replica must settle on the same state.
    deadline = time.monotonic() + 15
    while len(set((states := replica_states(healthy_lab, publisher.stream)).values())) != 1 or len(states) != 3:
        assert time.monotonic() < deadline, f"replicas differ: {states}"
        time.sleep(0.5)
    assert next(iter(states.values()))[0] == len(publisher.tally.acked), states
    assert_nothing_lost(publisher)
    tally = publisher.tally
    print(
        f"reset-jetstream node mode: {elapsed:.1f} s to healthy; published {tally.attempted}, "
        f"acked {len(tally.acked)}, failed {len(tally.failed)}, retries {tally.retries}; replicas {states}"
    )


async def _fill_stream(cluster: Cluster) -> None:
    nc = await connect(cluster, "reset-test")
    try:
        js = nc.jetstream(timeout=10)
        await js.add_stream(
            StreamConfig(name=STREAM, subjects=["labreset.>"], storage=StorageType.FILE, num_replicas=3)
        )
        for n in range(500):
            await js.publish(f"labreset.{n % 7}", f"event-{n}".encode(), headers={"Nats-Msg-Id": f"id-{n}"})
        await js.delete_msg(STREAM, 250)
    finally:
        await nc.close()


async def _dump_stream(cluster: Cluster) -> list[tuple[Any, ...]]:
    """Every message: sequence, subject, payload, headers, timestamp."""
    nc = await connect(cluster, "reset-test")
    try:
        js = nc.jetstream(timeout=10)
        info = await js.stream_info(STREAM)
        messages = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(STREAM, seq)
            except nats.js.errors.NotFoundError:
                continue
            messages.append((msg.seq, msg.subject, msg.data, msg.headers, msg.time))
        return messages
    finally:
        await nc.close()


def reset_cluster(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Cluster mode, its snapshots kept under tmp_path."""
    snapshots = f"reset_jetstream_snapshot_dir={tmp_path / 'snapshots'}"
    return run_playbook(PLAYBOOK, LAB_INVENTORY, *CLUSTER_RESET, "-e", snapshots, *extra, timeout=900)


def corrupt_meta_state(host: str, system_account: str) -> None:
    """Overwrites the meta group's raft state (log, snapshot, peers) with garbage. It lives under
    the system account's directory in the store."""
    meta = f"/mnt/cimstor-jetstream/{host}/jetstream/{system_account}/_js_/_meta_"
    on(host, f"cd {meta} && for f in meta.inf peers.idx snapshots/* msgs/*.blk; do head -c 300 /dev/urandom > $f; done")


def test_cluster_reset_restores_the_streams_after_meta_corruption(healthy_lab: Cluster, tmp_path: Path) -> None:
    cluster = healthy_lab
    delete_stream(cluster, STREAM)
    asyncio.run(_fill_stream(cluster))
    before = asyncio.run(_dump_stream(cluster))
    assert len(before) == 499
    for node in healthy_lab.nodes:
        corrupt_meta_state(node.host, healthy_lab.setting("nats_server_system_account"))
    stored = {node.host: backups(node.host) for node in healthy_lab.nodes}

    started = time.monotonic()
    result = reset_cluster(tmp_path, "-e", "reset_jetstream_restore=true")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:]
    assert (tmp_path / "snapshots" / "manifest.json").exists()
    for node in healthy_lab.nodes:
        assert len(set(backups(node.host)) - set(stored[node.host])) == 1, backups(node.host)
    wait_healthy(healthy_lab)
    assert asyncio.run(_dump_stream(cluster)) == before
    assert len(set(replica_states(healthy_lab, STREAM).values())) == 1
    code, _, _, output = nats_verify(tmp_path)
    assert code == 0, output[-3000:]
    delete_stream(cluster, STREAM)
    print(
        f"reset-jetstream cluster mode (snapshot, wipe, cold start, restore): {elapsed:.1f} s; 499 of 499 messages back"
    )


def test_cluster_mode_check_changes_nothing(healthy_lab: Cluster, tmp_path: Path) -> None:
    before = service_identities(healthy_lab)
    stored = {node.host: backups(node.host) for node in healthy_lab.nodes}
    result = reset_cluster(tmp_path, "--check")
    assert result.returncode == 0, result.stdout[-3000:]
    assert service_identities(healthy_lab) == before
    assert {node.host: backups(node.host) for node in healthy_lab.nodes} == stored
    assert not (tmp_path / "snapshots" / "manifest.json").exists()


def test_cluster_mode_stops_everywhere_when_one_store_fails(healthy_lab: Cluster, tmp_path: Path) -> None:
    """nats-3's store is stale: the run must stop before it touches nats-1 or nats-2 either."""
    before = service_identities(healthy_lab)
    stored = {node.host: backups(node.host) for node in healthy_lab.nodes if node.host != "nats-3"}
    assert nats_lab("fault", "stale-storage", "nats-3").returncode == 0
    result = reset_cluster(tmp_path)
    assert result.returncode != 0
    assert "The store on nats-3 fails its probe" in " ".join(result.stdout.split()), result.stdout[-3000:]
    assert service_identities(healthy_lab) == before
    assert {host: backups(host) for host in stored} == stored
    assert not (tmp_path / "snapshots").exists()
