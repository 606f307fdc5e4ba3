"""Acknowledged events lost to a site power cut, under NATS's default fsync policy and the deployed
one, side by side in one run (printed, not asserted): python -m benchmarks.durability

For each policy: site.yml deploys it (-e nats_server_jetstream_sync_interval=...), writers publish
acknowledged events to an R3 file stream for a while, then power is cut to all three hosts at once
(`nats-lab fault power-loss all`: the NFS stand-in loses every write not yet fsynced, as a real
site does) while they publish; `nats-lab heal` brings power back, and once every node is healthy
the stream is read back: every acknowledged event missing is counted. The append latency (p50,
p99) and throughput before the cut are printed with their ratio to the default's.

Needs the lab deployed (make lab); leaves it deployed with the inventory's own setting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

import nats
from nats.js.api import StorageType, StreamConfig

from tests.helpers import LAB_INVENTORY, delete_stream, nats_lab, run_playbook, wait_healthy
from verify.inventory import Cluster, load_cluster
from verify.load import connect

STREAM = "LAB_DURABILITY_BENCH"
SUBJECT = "labdurability"
# The variable's value "" is the server's own default (sync every 2 minutes).
DEFAULT = ""
# How long after power is back the cluster gets to be healthy before it is reported as not.
RECOVERY_SECONDS = 120


@dataclass
class Run:
    label: str
    setting: str
    acked: set[str] = field(default_factory=set)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    lost: int = 0
    stored: int = 0
    recovery_seconds: float = 0.0
    note: str = ""

    def percentile(self, share: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000 if ordered else float("nan")

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


def deploy(setting: str | None) -> None:
    extra = [] if setting is None else ["-e", json.dumps({"nats_server_jetstream_sync_interval": setting})]
    result = run_playbook("site.yml", LAB_INVENTORY, *extra, timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"site.yml {' '.join(extra)} failed:\n{result.stdout[-3000:]}")


async def recreate_stream(cluster: Cluster) -> None:
    nc = await connect(cluster, "durability-bench")
    try:
        js = nc.jetstream(timeout=10)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(STREAM)
        await js.add_stream(
            StreamConfig(name=STREAM, subjects=[f"{SUBJECT}.>"], storage=StorageType.FILE, num_replicas=3)
        )
    finally:
        await nc.close()


async def publish_then_cut(cluster: Cluster, run: Run, writers: int, seconds: float) -> None:
    """Writers publish for `seconds`; then power goes while they still publish."""
    nc = await connect(cluster, "durability-writers")
    js = nc.jetstream(timeout=2)
    stop = asyncio.Event()
    counting = True

    async def writer(number: int) -> None:
        sent = 0
        while not stop.is_set():
            sent += 1
            event = f"w{number:02d}-{sent:07d}"
            started = time.monotonic()
            try:
                await js.publish(f"{SUBJECT}.{number}", event.encode(), headers={"Nats-Msg-Id": event})
            except (nats.errors.Error, TimeoutError):
                await asyncio.sleep(0.05)
                continue
            run.acked.add(event)
            if counting:
                run.latencies.append(time.monotonic() - started)

    tasks = [asyncio.create_task(writer(n)) for n in range(writers)]
    await asyncio.sleep(seconds)
    counting = False
    run.seconds = seconds
    # The cut comes while the writers publish: acks just before it are the ones at risk.
    await asyncio.to_thread(nats_lab, "fault", "power-loss", "all")
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), 5)


async def stored_events(cluster: Cluster) -> set[str]:
    nc = await connect(cluster, "durability-audit")
    try:
        js = nc.jetstream(timeout=10)
        info = await js.stream_info(STREAM)
        events: set[str] = set()
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                events.add(((await js.get_msg(STREAM, seq)).data or b"").decode())
        return events
    finally:
        await nc.close()


def measure(cluster: Cluster, label: str, setting: str, writers: int, seconds: float) -> Run:
    deploy(setting)
    wait_healthy(cluster)
    run = Run(label, setting or "(server default)")
    asyncio.run(recreate_stream(cluster))
    asyncio.run(publish_then_cut(cluster, run, writers, seconds))
    healed = time.monotonic()
    nats_lab("heal")
    try:
        wait_healthy(cluster, seconds=RECOVERY_SECONDS)
        run.recovery_seconds = time.monotonic() - healed
    except AssertionError as unhealthy:
        # Measured under the default: the stream came back with no leader and no messages.
        run.recovery_seconds = float("nan")
        run.note = str(unhealthy)[:300]
    try:
        stored = asyncio.run(stored_events(cluster))
    except (nats.errors.Error, TimeoutError) as error:
        stored, run.note = set(), f"{run.note} stream unreadable: {type(error).__name__} {error}".strip()
    run.stored = len(stored)
    run.lost = len(run.acked - stored)
    delete_stream(cluster, STREAM)
    wait_healthy(cluster)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--writers", type=int, default=8, help="concurrent publishers (default 8)")
    parser.add_argument("--seconds", type=float, default=20.0, help="publishing before the cut (default 20)")
    parser.add_argument(
        "--candidate", default=None, help="the setting to compare with the default (default: the inventory's)"
    )
    args = parser.parse_args()
    cluster = load_cluster(LAB_INVENTORY)
    deployed = str(cluster.nodes[0].settings.get("nats_server_jetstream_sync_interval") or "")
    candidate = deployed if args.candidate is None else args.candidate
    policies = [("NATS default (2m)", DEFAULT), (f"sync_interval {candidate or 'default'}", candidate)]
    runs = [measure(cluster, label, setting, args.writers, args.seconds) for label, setting in policies]
    deploy(None)
    delete_stream(cluster, STREAM)
    base = runs[0]
    print(f"\nPower cut to all three lab hosts after {args.seconds:g} s of {args.writers} writers (R3 file stream)")
    print(f"deployed sync_interval: {deployed or '(server default)'}")
    print(f"{'policy':22} {'acked':>7} {'lost':>6} {'p50 ms':>8} {'p99 ms':>8} {'events/s':>9} {'heal->healthy s':>16}")
    for run in runs:
        print(
            f"{run.label:22} {len(run.acked):7d} {run.lost:6d} {run.percentile(0.5):8.2f} {run.percentile(0.99):8.2f} "
            f"{run.throughput:9.1f} {run.recovery_seconds:16.1f}"
        )
    for run in runs:
        if run.note:
            print(f"{run.label}: {run.note}")
    for run in runs[1:]:
        print(
            f"ratio {run.label} / {base.label}: p50 {run.percentile(0.5) / base.percentile(0.5):.2f}x, "
            f"p99 {run.percentile(0.99) / base.percentile(0.99):.2f}x, "
            f"throughput {run.throughput / base.throughput if base.throughput else float('nan'):.2f}x"
        )
    if base.lost == 0:
        print("NOTE: the default lost nothing: the fault did not catch unsynced writes (see docs/storage.md)")


if __name__ == "__main__":
    main()
