"""What `sync_interval: always` costs appends on a local disk, against NATS's default, side by side
in one run (printed, not asserted): python -m benchmarks.sync_local

The lab's figure (benchmarks.durability) is measured through the NFS stand-in, a FUSE daemon in
Python whose fsync path is the lab's, not an NFS server's. This run takes the stand-in away: three
loopback nats-servers (one JetStream cluster, stores on this machine's disk under build/), the
same R3 file stream and the same concurrent writers, once under the server's default and once
under `always`. The ratio of the two is what the setting itself costs on a real disk.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time

import nats
from nats.js.api import StorageType, StreamConfig

from tests.helpers import REPO
from tests.local_nats import local_trio

STREAM, SUBJECT = "SYNC_BENCH", "syncbench"
POLICIES = [("NATS default (2m)", ""), ("sync_interval always", "sync_interval: always")]


async def publish(urls: list[str], writers: int, seconds: float) -> tuple[list[float], float]:
    """Writers publish acknowledged events to an R3 file stream for `seconds`: each ack's latency."""
    nc = await nats.connect(servers=urls, connect_timeout=5)
    try:
        js = nc.jetstream(timeout=5)
        await js.add_stream(
            StreamConfig(name=STREAM, subjects=[f"{SUBJECT}.>"], storage=StorageType.FILE, num_replicas=3)
        )
        latencies: list[float] = []
        deadline = time.monotonic() + seconds

        async def writer(number: int) -> None:
            sent = 0
            while time.monotonic() < deadline:
                sent += 1
                started = time.monotonic()
                await js.publish(f"{SUBJECT}.{number}", f"w{number}-{sent}".encode())
                latencies.append(time.monotonic() - started)

        await asyncio.gather(*(writer(n) for n in range(writers)))
        return latencies, seconds
    finally:
        await nc.close()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--writers", type=int, default=8, help="concurrent publishers (default 8)")
    parser.add_argument("--seconds", type=float, default=10.0, help="publishing per setting (default 10)")
    args = parser.parse_args()
    # On the checkout's disk: a tmpfs would make every fsync free.
    workdir = REPO / "build" / "bench-sync-local"
    results = []
    for label, setting in POLICIES:
        shutil.rmtree(workdir, ignore_errors=True)
        with local_trio(workdir, jetstream=setting) as servers:
            latencies, seconds = asyncio.run(publish([s.client_url for s in servers], args.writers, args.seconds))
        results.append((label, latencies, len(latencies) / seconds))
    shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\nThree loopback nats-servers, R3 file stream on the local disk, "
        f"{args.writers} writers, {args.seconds:g} s each"
    )
    print(f"{'setting':22} {'acked':>7} {'p50 ms':>8} {'p99 ms':>8} {'events/s':>9}")
    for label, latencies, rate in results:
        print(
            f"{label:22} {len(latencies):7d} {percentile(latencies, 0.5):8.2f} "
            f"{percentile(latencies, 0.99):8.2f} {rate:9.1f}"
        )
    (_, base, base_rate), (label, candidate, rate) = results
    print(
        f"ratio {label} / default: p50 {percentile(candidate, 0.5) / percentile(base, 0.5):.2f}x, "
        f"p99 {percentile(candidate, 0.99) / percentile(base, 0.99):.2f}x, throughput {rate / base_rate:.2f}x"
    )


if __name__ == "__main__":
    main()
