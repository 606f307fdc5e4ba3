"""The event store's operations against a probe stream made for this run.

The probe has the shape of the CIM's INFRASTRUCTURE_EVENTS (R3, file storage, direct get, atomic
batches, a duplicate window) under its own subjects, so application streams are never written.
It and every consumer the checks create are removed at the end, even when checks fail.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, StorageType, StreamConfig

from verify import eventstore as es
from verify.client import connect
from verify.inventory import Cluster
from verify.plugin import RunState, client_urls

pytestmark = [pytest.mark.eventstore, pytest.mark.runbook("eventstore")]
T = TypeVar("T")
PROBE_PREFIX = "VERIFY_PROBE_"
LEFTOVER_AGE_SECONDS = 120


def _age_seconds(created: datetime | None) -> float:
    if created is None:
        return 0.0
    stamp = created if created.tzinfo else created.replace(tzinfo=UTC)
    return (datetime.now(UTC) - stamp).total_seconds()


class Probe:
    def __init__(self, cluster: Cluster, state: RunState) -> None:
        self.cluster = cluster
        self.state = state
        self.stream = f"{PROBE_PREFIX}{state.run_id}"
        self.prefix = f"verifyprobe.{state.run_id}.infrastructure"
        self.consumer_prefix = f"verify-{state.run_id}"
        self.replicas = min(3, len(cluster.nodes))

    def run(self, body: Callable[[Client], Awaitable[T]], seconds: float = 5.0) -> T:
        """body(nc) on a fresh connection, inside this check's share of the run's deadline."""

        servers = client_urls(self.state, self.cluster)

        async def main() -> T:
            nc = await connect(servers, self.state, login=self.cluster.login())
            try:
                return await body(nc)
            finally:
                await nc.close()

        return asyncio.run(asyncio.wait_for(main(), min(seconds, max(0.5, self.state.remaining()))))

    def aggregate(self) -> tuple[str, str]:
        aggregate_id = str(uuid.uuid4())
        return es.aggregate_filter(self.prefix, "host", aggregate_id), aggregate_id

    def subject(self, aggregate_id: str, event_type: str) -> str:
        return es.event_subject(self.prefix, "host", aggregate_id, event_type)


def event(event_type: str = "created", **data: Any) -> es.Event:
    return es.Event(event_type=event_type, data=dict(data), event_id=str(uuid.uuid4()))


@pytest.fixture(scope="module")
def probe(nats_cluster: Cluster, verify_state: RunState) -> Iterator[Probe]:
    probe = Probe(nats_cluster, verify_state)

    async def create(nc: Client) -> None:
        js = nc.jetstream(timeout=3)
        # Probes an earlier run could not remove (it ran into a fault) go first; a probe younger
        # than that may belong to a run still going.
        for info in await js.streams_info():
            name = info.config.name or ""
            if name.startswith(PROBE_PREFIX) and _age_seconds(info.created) > LEFTOVER_AGE_SECONDS:
                await js.delete_stream(name)
        await js.add_stream(
            StreamConfig(
                name=probe.stream,
                subjects=[f"{probe.prefix}.>"],
                storage=StorageType.FILE,
                num_replicas=probe.replicas,
                allow_direct=True,
                allow_atomic=True,
                duplicate_window=120.0,
                max_age=600.0,
            )
        )
        # A new R3 stream elects its leader after the create returns: wait for a leader with a
        # quorum of current replicas so the checks do not race the election.
        while True:
            info = await js.stream_info(probe.stream)
            if info.cluster and info.cluster.leader:
                current = 1 + sum(bool(r.current) for r in info.cluster.replicas or [])
                if current > probe.replicas // 2:
                    return
            await asyncio.sleep(0.1)

    probe.run(create, 8)
    yield probe

    async def remove(nc: Client) -> None:
        js = nc.jetstream(timeout=3)
        for attempt in range(3):
            try:
                await js.delete_stream(probe.stream)
                return
            except nats.js.errors.NotFoundError:
                return
            except nats.errors.Error:
                if attempt == 2:
                    raise
                await asyncio.sleep(0.3)

    # The probe goes even when checks failed; a run past its deadline still gets a few seconds.
    probe.state.deadline = max(probe.state.deadline, time.monotonic() - probe.state.started + 4)
    probe.run(remove, 4)


def test_append_then_read_back_one_aggregate(probe: Probe) -> None:
    flt, agg = probe.aggregate()
    events = [event("created", n=1), event("renamed", n=2), event("retired", n=3)]

    async def body(nc: Client) -> list[es.StoredEvent]:
        js = nc.jetstream(timeout=2)
        expected = 0
        for plain in events:
            sent = es.Event(plain.event_type, plain.data, plain.event_id, {"Correlation-Id": agg})
            ack = await es.append(
                js, probe.subject(agg, sent.event_type), sent, expected_last_sequence=expected, expectation_subject=flt
            )
            expected = ack.seq
        return await es.read_aggregate(nc, probe.stream, flt)

    stored = probe.run(body)
    assert [s.payload for s in stored] == [e.payload() for e in events], "payloads or order changed"
    assert all(s.headers.get("Correlation-Id") == agg for s in stored), "headers lost"


def test_batch_append_is_all_or_nothing(probe: Probe) -> None:
    flt, agg = probe.aggregate()

    async def body(nc: Client) -> int:
        js = nc.jetstream(timeout=2)
        batch = [(probe.subject(agg, t), event(t)) for t in ("created", "renamed", "tagged")]
        await es.append_batch(
            nc, js, batch, batch_id=uuid.uuid4().hex, expected_last_sequence=0, expectation_subject=flt
        )
        stale = [(probe.subject(agg, t), event(t)) for t in ("renamed", "retired")]
        with pytest.raises(es.ConcurrencyConflict):
            await es.append_batch(
                nc, js, stale, batch_id=uuid.uuid4().hex, expected_last_sequence=0, expectation_subject=flt
            )
        return len(await es.read_aggregate(nc, probe.stream, flt))

    assert probe.run(body) == 3, "a batch with a stale expectation stored something"


def test_never_written_aggregate_reads_empty_at_once(probe: Probe) -> None:
    flt, _ = probe.aggregate()

    async def body(nc: Client) -> tuple[list[es.StoredEvent], float]:
        start = time.monotonic()
        events = await es.read_aggregate(nc, probe.stream, flt)
        return events, time.monotonic() - start

    events, seconds = probe.run(body)
    assert events == []
    assert seconds < 0.5, f"empty read took {seconds:.2f} s"


def test_optimistic_concurrency(probe: Probe) -> None:
    flt, agg = probe.aggregate()

    async def body(nc: Client) -> list[BaseException | None]:
        js = nc.jetstream(timeout=2)
        first = await es.append(
            js, probe.subject(agg, "created"), event(), expected_last_sequence=0, expectation_subject=flt
        )
        with pytest.raises(es.ConcurrencyConflict):
            await es.append(
                js, probe.subject(agg, "created"), event(), expected_last_sequence=0, expectation_subject=flt
            )
        second = await es.append(
            js,
            probe.subject(agg, "renamed"),
            event("renamed"),
            expected_last_sequence=first.seq,
            expectation_subject=flt,
        )
        with pytest.raises(es.ConcurrencyConflict):
            await es.append(
                js,
                probe.subject(agg, "retired"),
                event("retired"),
                expected_last_sequence=first.seq,
                expectation_subject=flt,
            )
        assert await es.last_sequence(js, probe.stream, flt) == second.seq
        # Concurrent writers with one expectation on a new aggregate: exactly one wins.
        race_flt, race = probe.aggregate()
        results = await asyncio.gather(
            *(
                es.append(
                    js,
                    probe.subject(race, "created"),
                    event(w=w),
                    expected_last_sequence=0,
                    expectation_subject=race_flt,
                )
                for w in range(10)
            ),
            return_exceptions=True,
        )
        return [r if isinstance(r, BaseException) else None for r in results]

    results = probe.run(body)
    winners = results.count(None)
    assert winners == 1, f"{winners} of 10 concurrent writers won"
    assert all(isinstance(r, es.ConcurrencyConflict) for r in results if r is not None), results


def test_idempotent_retry_stores_no_duplicate(probe: Probe) -> None:
    flt, agg = probe.aggregate()
    once = event()

    async def body(nc: Client) -> tuple[bool, int]:
        js = nc.jetstream(timeout=2)
        await es.append(js, probe.subject(agg, "created"), once, expected_last_sequence=None)
        again = await es.append(js, probe.subject(agg, "created"), once, expected_last_sequence=None)
        return bool(again.duplicate), len(await es.read_aggregate(nc, probe.stream, flt))

    duplicate, stored = probe.run(body)
    assert duplicate and stored == 1, f"retry stored {stored} copies"


def test_bounded_fetch_and_consumer_lifecycle(probe: Probe) -> None:
    """A fetch that finds nothing ends within its timeout plus a margin; every consumer made here
    carries an inactive threshold and is gone at the end."""
    flt, _ = probe.aggregate()
    name = f"{probe.consumer_prefix}-fetch"

    async def body(nc: Client) -> tuple[float, float | None, list[str]]:
        js = nc.jetstream(timeout=2)
        await js.add_consumer(probe.stream, ConsumerConfig(name=name, filter_subject=flt, inactive_threshold=30.0))
        psub = await js.pull_subscribe_bind(durable=name, stream=probe.stream)
        start = time.monotonic()
        assert await es.fetch_bounded(psub, batch=10, timeout=0.5, margin=0.5) == []
        took = time.monotonic() - start
        info = await js.consumer_info(probe.stream, name)
        threshold = info.config.inactive_threshold
        await psub.unsubscribe()
        await js.delete_consumer(probe.stream, name)
        left = [
            c.name for c in await js.consumers_info(probe.stream) if (c.name or "").startswith(probe.consumer_prefix)
        ]
        return took, threshold, left

    took, threshold, left = probe.run(body)
    assert took < 1.0, f"an empty fetch took {took:.2f} s (timeout 0.5 s)"
    assert threshold, "consumer without an inactive threshold"
    assert left == [], f"consumers left behind: {left}"
