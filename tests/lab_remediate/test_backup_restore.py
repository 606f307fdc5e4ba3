"""playbooks/backup-streams.yml and playbooks/remediate/restore-streams.yml on the lab.

10,000 events (headers, a gap) in an R3 stream are backed up while an R3 publisher runs (nothing
it publishes is lost); the cluster's whole JetStream state is wiped (reset-jetstream cluster mode
without its own restore, so INFRASTRUCTURE_EVENTS comes back empty); the restore brings every event
back with its sequence, subject, headers, payload and timestamp, and replaces the empty declared
stream with its saved copy. The scheduled job (backup-schedule.yml) takes a set on monitor-1 under
its hardened unit, and a drill of that set on the live cluster restores it and changes nothing. A
stream holding data the set lacks is refused, and replaced only when named and confirmed, saved
first. Timings printed.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from nats_lab.config import load_lab
from nats_lab.hosts import upper_dir
from tests.helpers import (
    CLUSTER_RESET,
    LAB_INVENTORY,
    NATS_SERVER_VERSION,
    REPO,
    assert_nothing_lost,
    delete_stream,
    nats_verify,
    on,
    recap,
    run_playbook,
    service_identities,
    wait_healthy,
)
from verify.inventory import Cluster
from verify.load import BackgroundPublisher, connect

pytestmark = pytest.mark.lab

BACKUP, RESTORE, RESET = "backup-streams.yml", "remediate/restore-streams.yml", "remediate/reset-jetstream.yml"
SCHEDULE, BACKUP_HOST, BACKUP_UNIT = "backup-schedule.yml", "monitor-1", "nats-jetstream-backup-phx-cluster"
STREAM, EVENTS = "LAB_BACKUP", 10_000
DECLARED = "INFRASTRUCTURE_EVENTS"


async def _fill(cluster: Cluster, name: str = STREAM, count: int = EVENTS) -> None:
    nc = await connect(cluster, "backup-test")
    try:
        js = nc.jetstream(timeout=10)
        await js.add_stream(StreamConfig(name=name, subjects=["labbackup.>"], storage=StorageType.FILE, num_replicas=3))
        batch = 500
        for start in range(0, count, batch):
            acks = [
                await js.publish_async(
                    f"labbackup.{n % 7}",
                    f"event-{n}".encode(),
                    headers={"Nats-Msg-Id": f"id-{n}", "X-Trace": f"trace-{n}"},
                )
                for n in range(start, min(start + batch, count))
            ]
            await asyncio.gather(*acks)
        await js.delete_msg(name, count // 2)  # a gap the restore must keep
    finally:
        await nc.close()


async def _dump(cluster: Cluster, name: str = STREAM) -> list[tuple[Any, ...]]:
    """Every message (sequence, subject, payload, headers, timestamp), read through a pull
    consumer that is deleted afterwards."""
    nc = await connect(cluster, "backup-test")
    try:
        js = nc.jetstream(timeout=10)
        info = await js.stream_info(name)
        consumer = f"dump-{time.monotonic_ns()}"
        await js.add_consumer(
            name,
            ConsumerConfig(
                name=consumer,
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.ALL,
                inactive_threshold=30.0,
            ),
        )
        pull = await js.pull_subscribe_bind(consumer, stream=name)
        messages: list[tuple[Any, ...]] = []
        try:
            while len(messages) < info.state.messages:
                for msg in await pull.fetch(500, timeout=5):
                    meta = msg.metadata
                    messages.append((meta.sequence.stream, msg.subject, msg.data, msg.headers, meta.timestamp))
        finally:
            await pull.unsubscribe()
            await js.delete_consumer(name, consumer)
        return messages
    finally:
        await nc.close()


async def _streams(cluster: Cluster) -> dict[str, Any]:
    """Every stream's state (messages, bytes, sequences) and consumer names."""
    nc = await connect(cluster, "backup-test")
    try:
        found = {}
        reply = json.loads((await nc.request("$JS.API.STREAM.NAMES", b"{}", timeout=10)).data)
        for name in sorted(reply.get("streams") or []):
            info = json.loads((await nc.request(f"$JS.API.STREAM.INFO.{name}", b"", timeout=10)).data)
            state = info["state"]
            consumers = json.loads((await nc.request(f"$JS.API.CONSUMER.NAMES.{name}", b"{}", timeout=10)).data)
            found[name] = {
                "state": {k: state.get(k) for k in ("messages", "bytes", "first_seq", "last_seq", "num_deleted")},
                "consumers": sorted(consumers.get("consumers") or []),
            }
        return found
    finally:
        await nc.close()


async def _publish(cluster: Cluster, subject: str, payload: bytes) -> None:
    nc = await connect(cluster, "backup-test")
    try:
        await nc.jetstream(timeout=10).publish(subject, payload)
    finally:
        await nc.close()


def backup(tmp_path: Path) -> tuple[Path, float, str]:
    """backup-streams.yml into tmp_path/backups: the new set, seconds, output."""
    started = time.monotonic()
    result = run_playbook(BACKUP, LAB_INVENTORY, "-e", f"jetstream_backup_dir={tmp_path / 'backups'}", timeout=900)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:]
    found = re.search(r"Backup set (\S+):", result.stdout)
    assert found, result.stdout[-3000:]
    return Path(found.group(1)), elapsed, " ".join(result.stdout.split())


def restore(tmp_path: Path, backup_set: Path, *extra: str) -> tuple[int, float, str]:
    started = time.monotonic()
    result = run_playbook(
        RESTORE,
        LAB_INVENTORY,
        "-e",
        f"jetstream_backup_set={backup_set}",
        "-e",
        f"jetstream_backup_dir={tmp_path / 'backups'}",
        *extra,
        timeout=900,
    )
    return result.returncode, time.monotonic() - started, " ".join(result.stdout.split())


def test_backup_wipe_and_restore_bring_every_event_back(healthy_lab: Cluster, tmp_path: Path) -> None:
    cluster = healthy_lab
    delete_stream(cluster, STREAM)
    asyncio.run(_fill(cluster))
    before = asyncio.run(_dump(cluster))
    assert len(before) == EVENTS - 1 and before[0][3]["X-Trace"] == "trace-0"
    declared_before = asyncio.run(_streams(cluster))[DECLARED]["state"]

    # The backup, under an R3 publishing load: nothing the publisher had acked may be lost.
    with BackgroundPublisher(cluster, stream="LAB_PROBE_BACKUP", subject="labprobe.backup") as publisher:
        time.sleep(1)
        backup_set, backup_seconds, output = backup(tmp_path)
        time.sleep(1)
    assert_nothing_lost(publisher)
    assert f"{STREAM}: {EVENTS - 1} messages (seq 1-{EVENTS})" in output, output[-3000:]
    manifest = json.loads((backup_set / "manifest.json").read_text())
    assert {s["name"] for s in manifest["streams"]} >= {STREAM, DECLARED, "LAB_PROBE_BACKUP"}
    delete_stream(cluster, "LAB_PROBE_BACKUP")

    # Wipe every node's JetStream state; the run creates the declared stream again, empty.
    result = run_playbook(
        RESET,
        LAB_INVENTORY,
        *CLUSTER_RESET,
        "-e",
        "reset_jetstream_restore=false",
        "-e",
        f"reset_jetstream_snapshot_dir={tmp_path / 'reset-snapshots'}",
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    wait_healthy(cluster)
    wiped = asyncio.run(_streams(cluster))
    assert STREAM not in wiped and wiped[DECLARED]["state"]["messages"] == 0, wiped

    code, restore_seconds, output = restore(tmp_path, backup_set)
    assert code == 0, output[-4000:]
    assert re.search(rf"{STREAM}: {EVENTS - 1} messages .*, was missing: restored,", output), output[-3000:]
    if declared_before["messages"] or declared_before["last_seq"]:
        assert re.search(rf"{DECLARED}: .*, was empty: replaced,", output), output[-3000:]
    else:  # saved empty: the recreated empty stream already holds what the set has
        assert f"{DECLARED}: left alone, already holds the messages of the backup" in output, output[-3000:]
    wait_healthy(cluster)
    assert asyncio.run(_dump(cluster)) == before
    restored = asyncio.run(_streams(cluster))
    assert restored[DECLARED]["state"] == declared_before
    code, _, _, verify_output = nats_verify(tmp_path)
    assert code == 0, verify_output[-3000:]
    delete_stream(cluster, STREAM)
    delete_stream(cluster, "LAB_PROBE_BACKUP")  # restored with the set
    print(
        f"backup of {EVENTS - 1} events (+ the other streams, under R3 load): {backup_seconds:.1f} s; "
        f"restore after a cluster wipe: {restore_seconds:.1f} s; every event back"
    )


def scheduled_backup() -> tuple[Path, float, str]:
    """backup-schedule.yml installs the job on the lab's backup host, and one start of its service
    takes a set there, as the timer would: the set (read from the host's own disk, the overlay's
    upper directory), the seconds the service ran, and its journal."""
    result = run_playbook(SCHEDULE, LAB_INVENTORY, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    assert recap(result.stdout).keys() == {BACKUP_HOST}, result.stdout[-3000:]
    unit = f"{BACKUP_UNIT}.service"
    started = time.monotonic()
    on(BACKUP_HOST, f"systemctl start {unit} || {{ journalctl -u {unit} -o cat --no-pager | tail -60; exit 1; }}", 600)
    elapsed = time.monotonic() - started
    journal = " ".join(on(BACKUP_HOST, f"journalctl -u {unit} -o cat --no-pager").split())
    sets = re.findall(r"Backup set (\S+):", journal)
    assert sets, journal[-3000:]
    owner = on(BACKUP_HOST, f"stat -c '%U %a' {sets[-1]}").split()
    assert owner == ["nats-backup", "700"], owner
    lab = load_lab(REPO)
    return upper_dir(lab, lab.host(BACKUP_HOST)) / sets[-1].lstrip("/"), elapsed, journal


def test_the_scheduled_set_restores_in_a_drill_that_changes_nothing_live(healthy_lab: Cluster, tmp_path: Path) -> None:
    cluster = healthy_lab
    delete_stream(cluster, STREAM)
    asyncio.run(_fill(cluster, count=500))
    backup_set, job_seconds, journal = scheduled_backup()
    assert f"{STREAM}: 499 messages (seq 1-500)" in journal, journal[-3000:]
    exposure = on(BACKUP_HOST, f"systemd-analyze security --no-pager {BACKUP_UNIT}.service | tail -1").strip()
    print(f"scheduled backup on {BACKUP_HOST}: {job_seconds:.1f} s, {exposure}")
    asyncio.run(_publish(cluster, "labbackup.late", b"after the backup"))  # live differs from the set
    before, identities = asyncio.run(_streams(cluster)), service_identities(cluster)
    started = time.monotonic()
    code, _, output = restore(tmp_path, backup_set, "-e", "jetstream_restore_drill=true")
    elapsed = time.monotonic() - started
    assert code == 0, output[-4000:]
    assert (
        "Every stream restored and matches the manifest" in output
        and f"saved from nats-server {NATS_SERVER_VERSION}" in output
    )
    assert asyncio.run(_streams(cluster)) == before
    assert service_identities(cluster) == identities
    assert not list((tmp_path / "backups").glob(".restore-drill-*"))
    delete_stream(cluster, STREAM)
    print(f"restore drill of the scheduled set (release fetched from the lab mirror): {elapsed:.1f} s")


def test_a_stream_holding_data_is_replaced_only_when_named_and_confirmed(healthy_lab: Cluster, tmp_path: Path) -> None:
    cluster = healthy_lab
    delete_stream(cluster, STREAM)
    asyncio.run(_fill(cluster, count=500))
    saved = asyncio.run(_dump(cluster))
    backup_set, _, _ = backup(tmp_path)
    asyncio.run(_publish(cluster, "labbackup.late", b"after the backup"))
    changed = asyncio.run(_streams(cluster))

    code, _, output = restore(tmp_path, backup_set)
    assert code != 0
    assert f"{STREAM} (500 messages, seq 1-501; the backup has 499 messages, seq 1-500)" in output, output[-3000:]
    assert asyncio.run(_streams(cluster)) == changed

    code, _, output = restore(
        tmp_path, backup_set, "-e", f"jetstream_restore_overwrite={STREAM}", "-e", f"jetstream_restore_confirm={STREAM}"
    )
    assert code == 0, output[-4000:]
    assert asyncio.run(_dump(cluster)) == saved
    kept = list((tmp_path / "backups" / "phx-cluster").glob("before-restore-*"))
    assert len(kept) == 1
    entry = json.loads((kept[0] / "manifest.json").read_text())["streams"][0]
    assert (entry["name"], entry["messages"], entry["last_seq"]) == (STREAM, 500, 501)
    wait_healthy(cluster)
    delete_stream(cluster, STREAM)
