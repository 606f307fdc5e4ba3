"""verify.eventstore against a real single-node nats-server on loopback (fast, no lab)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import StorageType, StreamConfig

from tests.local_nats import local_jetstream
from verify import eventstore as es

PREFIX = "probe.infrastructure"
STREAM = "PROBE_EVENTS"


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with local_jetstream(tmp_path_factory.mktemp("nats")) as url:
        yield url


Body = Callable[[Client], Awaitable[None]]


def run_with_stream(server_url: str, body: Body, deadline: float = 15) -> None:
    """Runs body(nc) against a fresh probe stream, removed afterwards, all inside a deadline."""

    async def main() -> None:
        client = await nats.connect(server_url, connect_timeout=2)
        js = client.jetstream(timeout=2)
        await js.add_stream(
            StreamConfig(
                name=STREAM,
                subjects=[f"{PREFIX}.>"],
                storage=StorageType.FILE,
                allow_direct=True,
                allow_atomic=True,
                duplicate_window=120.0,
            )
        )
        try:
            await body(client)
        finally:
            await js.delete_stream(STREAM)
            await client.close()

    asyncio.run(asyncio.wait_for(main(), deadline))


@pytest.fixture
def with_stream(server_url: str) -> Callable[[Body], None]:
    return lambda body: run_with_stream(server_url, body)


def new_event(event_type: str = "created", **data: object) -> es.Event:
    return es.Event(event_type=event_type, data=dict(data), event_id=str(uuid.uuid4()))


def aggregate() -> tuple[str, str]:
    aggregate_id = str(uuid.uuid4())
    return es.aggregate_filter(PREFIX, "host", aggregate_id), aggregate_id


def subject(aggregate_id: str, event_type: str) -> str:
    return es.event_subject(PREFIX, "host", aggregate_id, event_type)


def test_append_then_read_back_keeps_payload_headers_and_order(with_stream: Callable[[Body], None]) -> None:
    async def body(nc: Client) -> None:
        js = nc.jetstream(timeout=2)
        flt, agg = aggregate()
        events = [new_event("created", n=1), new_event("renamed", n=2), new_event("retired", n=3)]
        expected = 0
        for plain in events:
            event = es.Event(plain.event_type, plain.data, plain.event_id, {"Correlation-Id": "c-1"})
            ack = await es.append(
                js, subject(agg, event.event_type), event, expected_last_sequence=expected, expectation_subject=flt
            )
            expected = ack.seq
        stored = await es.read_aggregate(nc, STREAM, flt)
        assert [s.payload for s in stored] == [e.payload() for e in events]
        assert [s.subject for s in stored] == [subject(agg, e.event_type) for e in events]
        assert all(s.headers.get("Correlation-Id") == "c-1" for s in stored)
        assert [s.headers[es.MSG_ID] for s in stored] == [e.event_id for e in events]

    with_stream(body)


def test_empty_aggregate_reads_empty_at_once(with_stream: Callable[[Body], None]) -> None:
    async def body(nc: Client) -> None:
        flt, _ = aggregate()
        start = time.monotonic()
        assert await es.read_aggregate(nc, STREAM, flt) == []
        assert await es.last_sequence(nc.jetstream(), STREAM, flt) == 0
        assert time.monotonic() - start < 0.5

    with_stream(body)


def test_read_of_a_long_aggregate_spans_batches(with_stream: Callable[[Body], None]) -> None:
    async def body(nc: Client) -> None:
        js = nc.jetstream(timeout=2)
        flt, agg = aggregate()
        count = es.DIRECT_BATCH_LIMIT + 20
        await asyncio.gather(
            *(
                es.append(js, subject(agg, "tick"), new_event("tick", i=i), expected_last_sequence=None)
                for i in range(count)
            )
        )
        assert len(await es.read_aggregate(nc, STREAM, flt)) == count

    with_stream(body)


def test_optimistic_concurrency_on_the_server(with_stream: Callable[[Body], None]) -> None:
    async def body(nc: Client) -> None:
        js = nc.jetstream(timeout=2)
        flt, agg = aggregate()
        first = await es.append(
            js, subject(agg, "created"), new_event(), expected_last_sequence=0, expectation_subject=flt
        )
        with pytest.raises(es.ConcurrencyConflict):
            await es.append(js, subject(agg, "created"), new_event(), expected_last_sequence=0, expectation_subject=flt)
        second = await es.append(
            js, subject(agg, "renamed"), new_event("renamed"), expected_last_sequence=first.seq, expectation_subject=flt
        )
        with pytest.raises(es.ConcurrencyConflict):
            await es.append(
                js,
                subject(agg, "renamed"),
                new_event("renamed"),
                expected_last_sequence=first.seq,
                expectation_subject=flt,
            )
        assert await es.last_sequence(js, STREAM, flt) == second.seq

    with_stream(body)


def test_concurrent_writers_with_one_expectation_exactly_one_wins(with_stream: Callable[[Body], None]) -> None:
    async def body(nc: Client) -> None:
        js = nc.jetstream(timeout=2)
        flt, agg = aggregate()
        results = await asyncio.gather(
            *(
                es.append(
                    js, subject(agg, "created"), new_event(w=w), expected_last_sequence=0, expectation_subject=flt
                )
                for w in range(20)
            ),
            return_exceptions=True,
        )
        assert sum(not isinstance(r, BaseException) for r in results) == 1
        assert all(isinstance(r, es.ConcurrencyConflict) for r in results if isinstance(r, BaseException))
        assert len(await es.read_aggregate(nc, STREAM, flt)) == 1

    with_stream(body)


def test_idempotent_retry_stores_no_duplicate(with_stream: Callable[[Body], None]) -> None:
    async def body(nc: Client) -> None:
        js = nc.jetstream(timeout=2)
        flt, agg = aggregate()
        event = new_event()
        first = await es.append(js, subject(agg, "created"), event, expected_last_sequence=None)
        again = await es.append(js, subject(agg, "created"), event, expected_last_sequence=None)
        assert again.duplicate and again.seq == first.seq
        assert len(await es.read_aggregate(nc, STREAM, flt)) == 1

    with_stream(body)


def test_atomic_batch_is_all_or_nothing(with_stream: Callable[[Body], None]) -> None:
    async def body(nc: Client) -> None:
        js = nc.jetstream(timeout=2)
        flt, agg = aggregate()
        batch = [(subject(agg, t), new_event(t)) for t in ("created", "renamed", "tagged")]
        ack = await es.append_batch(
            nc, js, batch, batch_id=uuid.uuid4().hex, expected_last_sequence=0, expectation_subject=flt
        )
        assert ack.seq == await es.last_sequence(js, STREAM, flt)
        stale = [(subject(agg, t), new_event(t)) for t in ("renamed", "retired")]
        with pytest.raises(es.ConcurrencyConflict):
            await es.append_batch(
                nc, js, stale, batch_id=uuid.uuid4().hex, expected_last_sequence=0, expectation_subject=flt
            )
        assert len(await es.read_aggregate(nc, STREAM, flt)) == 3

    with_stream(body)


def test_bounded_fetch_on_nothing_ends_within_its_timeout(with_stream: Callable[[Body], None]) -> None:
    async def body(nc: Client) -> None:
        js = nc.jetstream(timeout=2)
        flt, _ = aggregate()
        psub = await js.pull_subscribe(flt, durable=None, stream=STREAM)
        try:
            start = time.monotonic()
            assert await es.fetch_bounded(psub, batch=10, timeout=0.3, margin=0.5) == []
            assert time.monotonic() - start < 0.3 + 0.5
        finally:
            await psub.unsubscribe()

    with_stream(body)
