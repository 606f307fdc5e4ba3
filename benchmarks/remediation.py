"""Runbook figures on the lab, printed (not asserted): python -m benchmarks.remediation

For each runbook, the time from playbook start to the end of its run (every runbook ends on full
/healthz), and for those run under continuous R3 publishing the messages published, acked,
failed after client retries and lost (acked but not stored). Needs the lab deployed (make lab);
leaves it deployed and healthy. Goal (issue #4): remount-storage <= 30 s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from tests.helpers import CLUSTER_RESET, LAB_INVENTORY, delete_stream, nats_lab, run_playbook, wait_healthy
from verify.inventory import Cluster, load_cluster
from verify.load import BackgroundPublisher, connect

Row = tuple[str, float, str]


def playbook(name: str, *extra: str) -> float:
    started = time.monotonic()
    result = run_playbook(name, LAB_INVENTORY, *extra, timeout=900)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"{name} {' '.join(extra)} failed:\n{result.stdout[-3000:]}")
    return elapsed


def under_load(cluster: Cluster, what: str, action: Callable[[], float]) -> Row:
    with BackgroundPublisher(cluster, stream="LAB_PROBE_BENCH", subject="labprobe.bench") as publisher:
        time.sleep(1)
        elapsed = action()
        time.sleep(1)
    missing, duplicated = publisher.audit()
    tally = publisher.tally
    note = (
        f"published {tally.attempted}, acked {len(tally.acked)}, failed {len(tally.failed)}, "
        f"lost {len(missing)}, duplicated {len(duplicated)}, client retries {tally.retries}"
    )
    wait_healthy(cluster)
    return what, elapsed, note


def remount(cluster: Cluster) -> float:
    nats_lab("fault", "stale-storage", "nats-2")
    elapsed = playbook("remediate/remount-storage.yml")
    nats_lab("heal")
    return elapsed


async def leak_consumers(cluster: Cluster, count: int) -> None:
    nc = await connect(cluster, "bench")
    try:
        js = nc.jetstream(timeout=10)
        await js.add_stream(
            StreamConfig(name="LAB_BENCH_CONSUMERS", subjects=["labbench.>"], storage=StorageType.FILE, num_replicas=3)
        )
        for n in range(count):
            await js.add_consumer(
                "LAB_BENCH_CONSUMERS",
                ConsumerConfig(durable_name=f"leak-{n}", filter_subject="labbench.x", ack_policy=AckPolicy.EXPLICIT),
            )
    finally:
        await nc.close()


def main() -> None:
    cluster = load_cluster(LAB_INVENTORY)
    wait_healthy(cluster)
    rows: list[Row] = [
        under_load(cluster, "remount-storage, nats-2 stale (goal <= 30 s)", lambda: remount(cluster)),
        under_load(
            cluster,
            "reset-jetstream, node mode (nats-2)",
            lambda: playbook(
                "remediate/reset-jetstream.yml",
                "-e",
                "reset_jetstream_node=nats-2",
                "-e",
                "reset_jetstream_confirm=nats-2",
            ),
        ),
        under_load(cluster, "rolling-restart", lambda: playbook("rolling-restart.yml")),
        under_load(
            cluster,
            "rolling-restart, version 2.15.1 -> 2.14.6",
            lambda: playbook(
                "rolling-restart.yml", "-e", "nats_server_version=2.14.6", "-e", "nats_server_upgrade=true"
            ),
        ),
        under_load(
            cluster,
            "rolling-restart, version 2.14.6 -> 2.15.1",
            lambda: playbook("rolling-restart.yml", "-e", "nats_server_upgrade=true"),
        ),
    ]
    for node in cluster.nodes:
        nats_lab("fault", "stale-storage", node.host)
    rows.append(
        (
            "remount-storage, every node stale, all at once",
            playbook("remediate/remount-storage.yml", "-e", "remount_storage_all_at_once=true"),
            "full outage by design; no load",
        )
    )
    nats_lab("heal")
    wait_healthy(cluster)
    delete_stream(cluster, "LAB_BENCH_CONSUMERS")
    asyncio.run(leak_consumers(cluster, 200))
    # The runbook refuses a stale_after under 30 s (a consumer between two pulls is not stale).
    time.sleep(31)
    purge = playbook(
        "remediate/purge-consumers.yml",
        "-e",
        "jetstream_streams_purge_stale_after=30s",
        "-e",
        "jetstream_streams_purge_delete=true",
    )
    rows.append(("purge-consumers, 200 leaked deleted", purge, "report + delete in one run"))
    delete_stream(cluster, "LAB_BENCH_CONSUMERS")
    reset_all = playbook("remediate/reset-jetstream.yml", *CLUSTER_RESET)
    rows.append(("reset-jetstream, cluster mode with restore", reset_all, "full outage by design; no load"))
    wait_healthy(cluster)
    print(f"{'runbook':48} {'seconds':>8}  messages")
    for what, seconds, note in rows:
        print(f"{what:48} {seconds:8.1f}  {note}")


if __name__ == "__main__":
    main()
