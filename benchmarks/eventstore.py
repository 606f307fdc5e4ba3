"""Event-store and verify figures on the deployed lab, printed (not asserted), each with its baseline
measured in the same run:  python -m benchmarks.eventstore

1. nats-verify wall time: healthy; with each lab fault on nats-3 (stop, kill, isolate,
   stale-storage); and after healing it, the time until verify is green again
2. empty-aggregate read: verify.eventstore (direct get) vs the CIM's fetch-until-timeout (2 s expiry)
   through a new ephemeral consumer with no inactive threshold of its own, as the CIM reads
3. OCC append rate vs plain publish, same R3 stream
4. replay of 10k events: batched direct get vs a raw ordered consumer
5. the CIM's own client (clients/cim-rust, async-nats 0.33) reading in its pattern at rising rates,
   20 s each, as the CIM user: the highest rate served with zero refusals, and the peak number of
   live consumers at each rate (INFRASTRUCTURE_EVENTS' consumer_count, sampled every second)
Goals (issue #3): verify <= 10 s healthy, <= 30 s with a node down or cut off; empty read >= 40x faster;
OCC >= 0.8x plain; replay >= 0.8x ordered consumer.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, StorageType, StreamConfig

from tests.clients import cim_contract_binary, client_env, run_json
from tests.helpers import LAB_INVENTORY, nats_lab, nats_verify, verify_until_green
from verify import eventstore as es
from verify.client import connect_tls_or_nothing
from verify.inventory import Cluster, load_cluster

STREAM = "BENCH_EVENTS"
PREFIX = "bench.infrastructure"
REPLAY_EVENTS = 10_000


FAULTS = ("stop", "kill", "isolate", "stale-storage")
FAULTY_NODE = "nats-3"
GREEN_WITHIN_SECONDS = 180


def lab(*args: str) -> None:
    result = nats_lab(*args)
    if result.returncode != 0:
        raise SystemExit(f"nats-lab {' '.join(args)} failed: {result.stderr.strip()}")


def fault_figures(workdir: Path) -> dict[str, tuple[float, float]]:
    """Per fault: verify's wall time with it, and seconds from the heal to a green verify."""
    figures = {}
    for fault in FAULTS:
        lab("fault", fault, FAULTY_NODE)
        try:
            code, _, failing, _ = nats_verify(workdir)
        finally:
            lab("heal", FAULTY_NODE)
        if code == 0:
            raise SystemExit(f"verify passed with {fault} on {FAULTY_NODE}")
        code, _, _, green_after = verify_until_green(workdir, GREEN_WITHIN_SECONDS)
        figures[fault] = (failing, green_after if code == 0 else float("inf"))
    return figures


def event(n: int) -> es.Event:
    return es.Event("ticked", {"n": n}, str(uuid.uuid4()))


async def cim_empty_read(nc: Client, subject_filter: str) -> float:
    """The CIM's read: a new ephemeral pull consumer on the aggregate with no inactive threshold
    of its own (the server's 5 s default ends it), fetch with a 2 s expiry, stop on timeout."""
    js = nc.jetstream(timeout=5)
    start = time.monotonic()
    psub = await js.pull_subscribe(subject_filter, stream=STREAM, config=ConsumerConfig())
    try:
        await psub.fetch(100, timeout=2)
    # nats-py 2.16 raises plain asyncio.TimeoutError (the builtin one on 3.11) from some fetch paths.
    except (TimeoutError, nats.errors.TimeoutError):
        pass
    finally:
        # Unsubscribing leaves the consumer, as the CIM leaves its own.
        await psub.unsubscribe()
    return time.monotonic() - start


async def our_empty_read(nc: Client, subject_filter: str) -> float:
    start = time.monotonic()
    await es.read_aggregate(nc, STREAM, subject_filter)
    return time.monotonic() - start


async def append_rates(nc: Client, count: int) -> tuple[float, float]:
    js = nc.jetstream(timeout=5)
    agg = str(uuid.uuid4())
    subject = es.event_subject(PREFIX, "host", agg, "ticked")
    start = time.monotonic()
    for n in range(count):
        await js.publish(subject, event(n).payload())
    plain = count / (time.monotonic() - start)
    agg = str(uuid.uuid4())
    flt = es.aggregate_filter(PREFIX, "host", agg)
    subject = es.event_subject(PREFIX, "host", agg, "ticked")
    expected = 0
    start = time.monotonic()
    for n in range(count):
        ack = await es.append(js, subject, event(n), expected_last_sequence=expected, expectation_subject=flt)
        expected = ack.seq
    occ = count / (time.monotonic() - start)
    return occ, plain


async def replay_rates(nc: Client) -> tuple[float, float]:
    js = nc.jetstream(timeout=10)
    agg = str(uuid.uuid4())
    flt = es.aggregate_filter(PREFIX, "host", agg)
    subject = es.event_subject(PREFIX, "host", agg, "ticked")
    for chunk in range(0, REPLAY_EVENTS, 500):
        acks = [await js.publish_async(subject, event(n).payload()) for n in range(chunk, chunk + 500)]
        await asyncio.gather(*acks)
    start = time.monotonic()
    events = await es.read_aggregate(nc, STREAM, flt, timeout=10)
    ours = len(events) / (time.monotonic() - start)
    assert len(events) == REPLAY_EVENTS, len(events)
    start = time.monotonic()
    sub = await js.subscribe(flt, ordered_consumer=True, stream=STREAM)
    seen = 0
    while True:
        msg = await sub.next_msg(timeout=10)
        seen += 1
        if msg.metadata.num_pending == 0:
            break
    await sub.unsubscribe()
    ordered = seen / (time.monotonic() - start)
    return ours, ordered


async def eventstore_figures(cluster: Cluster) -> dict[str, float]:
    nc = await connect_tls_or_nothing(servers=cluster.client_urls, connect_timeout=3, **cluster.login())
    js = nc.jetstream(timeout=10)
    try:
        await js.add_stream(
            StreamConfig(
                name=STREAM,
                subjects=[f"{PREFIX}.>"],
                storage=StorageType.FILE,
                num_replicas=3,
                allow_direct=True,
                allow_atomic=True,
            )
        )
        empty = [es.aggregate_filter(PREFIX, "host", str(uuid.uuid4())) for _ in range(5)]
        cim = [await cim_empty_read(nc, f) for f in empty]
        ours = [await our_empty_read(nc, f) for f in empty * 10]
        occ, plain = await append_rates(nc, 500)
        replay_ours, replay_ordered = await replay_rates(nc)
        return {
            "empty_cim": statistics.median(cim),
            "empty_ours": statistics.median(ours),
            "occ": occ,
            "plain": plain,
            "replay_ours": replay_ours,
            "replay_ordered": replay_ordered,
        }
    finally:
        await js.delete_stream(STREAM)
        await nc.close()


CIM_READ_RATES = (10, 20, 30, 40, 60, 80)
CIM_READ_SECONDS = 20


def cim_read_rates(cluster: Cluster) -> list[tuple[int, dict[str, Any]]]:
    """The CIM's reads through its own client at each rate, until one is refused."""
    figures = []
    for rate in CIM_READ_RATES:
        args = ["read-load", "--rate", str(rate), "--seconds", str(CIM_READ_SECONDS), "--end-on-no-messages"]
        _, report, output = run_json([str(cim_contract_binary()), *args], client_env(cluster), timeout=600)
        if "attempted" not in report:
            raise SystemExit(f"cim-contract read-load at {rate}/s gave no report: {output[-2000:]}")
        figures.append((rate, report))
        if report["served"] != report["attempted"]:
            break
        # The consumers of this rate go (5 s after their last pull) before the next rate starts.
        time.sleep(10)
    return figures


def main() -> None:
    cluster = load_cluster(LAB_INVENTORY)
    with tempfile.TemporaryDirectory() as workdir:
        code, _, healthy, _ = nats_verify(Path(workdir))
        if code != 0:
            raise SystemExit("verify fails on the lab before any fault: deploy it first (make lab)")
        faults = fault_figures(Path(workdir))
    f = asyncio.run(eventstore_figures(cluster))
    reads = cim_read_rates(cluster)
    print(f"{'figure':48} {'value':>12} {'baseline':>12} {'ratio':>8}  goal")
    print(f"{'nats-verify wall, healthy (s)':48} {healthy:12.2f} {'':>12} {'':>8}  <= 10 s")
    for fault, (failing, green_after) in faults.items():
        print(f"{f'nats-verify wall, {FAULTY_NODE} {fault} (s)':48} {failing:12.2f} {'':>12} {'':>8}  <= 30 s")
        print(f"{f'  heal of {fault} to verify green (s)':48} {green_after:12.2f}")
    print(
        f"{'empty-aggregate read, median (ms)':48} {f['empty_ours'] * 1000:12.2f} {f['empty_cim'] * 1000:12.1f} "
        f"{f['empty_cim'] / f['empty_ours']:7.0f}x  >= 40x faster than fetch-until-timeout"
    )
    occ_ratio = f["occ"] / f["plain"]
    print(
        f"{'OCC append rate vs plain publish (msg/s)':48} {f['occ']:12.0f} {f['plain']:12.0f} {occ_ratio:7.2f}x  >=0.8x"
    )
    print(
        f"{'replay of 10k events vs ordered consumer (ev/s)':48} {f['replay_ours']:12.0f} {f['replay_ordered']:12.0f} "
        f"{f['replay_ours'] / f['replay_ordered']:7.2f}x  >= 0.8x"
    )
    limit = int(cluster.setting("nats_server_app_jetstream_limits")["max_consumers"])
    for rate, r in reads:
        refused = r["attempted"] - r["served"]
        print(
            f"{f'CIM reads at {rate}/s for {CIM_READ_SECONDS} s: served of attempted':48} {r['served']:12d} "
            f"{r['attempted']:12d} {r['served'] / max(1, r['attempted']):7.3f}x  all served"
        )
        print(
            f"{'  peak live consumers / per-stream limit':48} {r['peak_consumers']:12d} {limit:12d} "
            f"{r['peak_consumers'] / limit:7.3f}x  far below; read p50 {r['latency_ms']['p50']:.0f} ms, "
            f"p99 {r['latency_ms']['p99']:.0f} ms"
            + (f"; {refused} refused: {r['refused']['errors'][:2]}" if refused else "")
        )
    served = [rate for rate, r in reads if r["served"] == r["attempted"]]
    print(f"{'sustained CIM read rate, zero refusals (reads/s)':48} {max(served, default=0):12d}")


if __name__ == "__main__":
    main()
