"""Event-store operations on JetStream the way the CIM uses them, bounded in time.

An aggregate is the set of messages on one subject, `<prefix>.<aggregate_type>.<uuid>.<event_type>`
filtered by `<prefix>.<aggregate_type>.<uuid>.*`. Every call here has a timeout, reads end when
nothing is pending (never on a timeout), and consumers it creates are deleted or expire.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import PubAck
from nats.js.client import JetStreamContext

EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
# The server filters the expectation by this subject (a wildcard covers the whole aggregate).
EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
MSG_ID = "Nats-Msg-Id"
BATCH_ID = "Nats-Batch-Id"
BATCH_SEQUENCE = "Nats-Batch-Sequence"
BATCH_COMMIT = "Nats-Batch-Commit"
# "wrong last sequence" (10071) and the R3 race variant (10164) both mean: someone wrote first.
CONFLICT_CODES = frozenset({10071, 10164})
DIRECT_BATCH_LIMIT = 1000


class ConcurrencyConflict(Exception):
    """The aggregate moved on since the expected sequence: reload and decide again."""

    def __init__(self, subject: str, expected: int, detail: str) -> None:
        super().__init__(f"{subject}: expected last sequence {expected}: {detail}")
        self.subject = subject
        self.expected = expected


@dataclass(frozen=True)
class Event:
    event_type: str
    data: dict[str, Any]
    event_id: str
    headers: dict[str, str] | None = None

    def payload(self) -> bytes:
        return json.dumps({"event_id": self.event_id, "event_type": self.event_type, "data": self.data}).encode()


@dataclass(frozen=True, slots=True)
class StoredEvent:
    subject: str
    sequence: int
    payload: bytes
    # As stored, plus the direct-get headers (Nats-Stream, Nats-Sequence, Nats-Subject ...).
    headers: dict[str, str]


def aggregate_filter(prefix: str, aggregate_type: str, aggregate_id: str) -> str:
    return f"{prefix}.{aggregate_type}.{aggregate_id}.*"


def event_subject(prefix: str, aggregate_type: str, aggregate_id: str, event_type: str) -> str:
    return f"{prefix}.{aggregate_type}.{aggregate_id}.{event_type}"


def _is_conflict(error: nats.js.errors.APIError) -> bool:
    return error.err_code in CONFLICT_CODES


async def last_sequence(js: JetStreamContext, stream: str, subject_filter: str) -> int:
    """Stream sequence of the aggregate's last event, 0 when it has none (answered at once)."""
    try:
        msg = await js.get_last_msg(stream, subject_filter, direct=True)
    except nats.js.errors.NotFoundError:
        return 0
    return int(msg.seq or 0)


def _expectation(expected_last_sequence: int | None, expectation_subject: str | None) -> dict[str, str]:
    if expected_last_sequence is None:
        return {}
    headers = {EXPECTED_LAST_SUBJECT_SEQUENCE: str(expected_last_sequence)}
    if expectation_subject:
        headers[EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT] = expectation_subject
    return headers


async def _publish_expecting(
    js: JetStreamContext, subject: str, event: Event, headers: dict[str, str], *, expected: int | None, timeout: float
) -> PubAck:
    """js.publish that turns the server's concurrency refusal into ConcurrencyConflict."""
    try:
        return await js.publish(subject, event.payload(), timeout=timeout, headers=headers)
    except nats.js.errors.APIError as error:
        if _is_conflict(error):
            raise ConcurrencyConflict(subject, expected or 0, str(error.description)) from error
        raise


async def append(
    js: JetStreamContext,
    subject: str,
    event: Event,
    *,
    expected_last_sequence: int | None,
    expectation_subject: str | None = None,
    timeout: float = 2.0,
) -> PubAck:
    """Appends one event. `expected_last_sequence` 0 means the aggregate must be new; None skips
    the check. The event id is the message id, so a retry never stores a duplicate."""
    headers = (
        {MSG_ID: event.event_id} | (event.headers or {}) | _expectation(expected_last_sequence, expectation_subject)
    )
    return await _publish_expecting(js, subject, event, headers, expected=expected_last_sequence, timeout=timeout)


async def append_batch(
    nc: Client,
    js: JetStreamContext,
    subjects_and_events: Sequence[tuple[str, Event]],
    *,
    batch_id: str,
    expected_last_sequence: int | None,
    expectation_subject: str | None = None,
    timeout: float = 5.0,
) -> PubAck:
    """Atomic batch (ADR-50, stream allow_atomic): all events are stored or none.

    The expectation rides on the first message; the commit on the last one returns the ack.
    """
    if not subjects_and_events:
        raise ValueError("an atomic batch needs at least one event")
    last = len(subjects_and_events)
    for index, (subject, event) in enumerate(subjects_and_events, start=1):
        headers = {MSG_ID: event.event_id, BATCH_ID: batch_id, BATCH_SEQUENCE: str(index)} | (event.headers or {})
        if index == 1:
            headers |= _expectation(expected_last_sequence, expectation_subject)
        if index == last:
            headers[BATCH_COMMIT] = "1"
            return await _publish_expecting(
                js, subject, event, headers, expected=expected_last_sequence, timeout=timeout
            )
        if index == 1:
            # The server answers the first member (empty reply) once the batch is open.
            await nc.request(subject, event.payload(), timeout=timeout, headers=headers)
        else:
            await nc.publish(subject, event.payload(), headers=headers)
    raise AssertionError("unreachable")


async def read_aggregate(nc: Client, stream: str, subject_filter: str, *, timeout: float = 2.0) -> list[StoredEvent]:
    """All events of one aggregate in order, by batched direct get: no consumer is created, an
    empty aggregate answers at once, and the read ends on the server's end-of-batch."""
    events: list[StoredEvent] = []
    next_sequence = 1
    while True:
        request = {"seq": next_sequence, "next_by_subj": subject_filter, "batch": DIRECT_BATCH_LIMIT}
        got = await _direct_batch(nc, stream, request, timeout)
        events.extend(got)
        if len(got) < DIRECT_BATCH_LIMIT:
            return events
        next_sequence = got[-1].sequence + 1


async def _direct_batch(nc: Client, stream: str, request: dict[str, Any], timeout: float) -> list[StoredEvent]:
    """One batched direct get; messages are collected by a callback (no per-message wait) until
    the server's end-of-batch status."""
    got: list[StoredEvent] = []
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def collect(msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is None:
            got.append(StoredEvent(headers["Nats-Subject"], int(headers["Nats-Sequence"]), msg.data, headers))
        elif done.done():
            return
        elif status in {"204", "404"}:  # 204 end of batch, 404 nothing (left) to read
            done.set_result(None)
        else:
            done.set_exception(
                nats.js.errors.APIError(description=f"direct get: {status} {headers.get('Description', '')}")
            )

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox)
        await asyncio.wait_for(done, timeout)
        return got
    finally:
        await sub.unsubscribe()


async def fetch_bounded(
    psub: JetStreamContext.PullSubscription, *, batch: int, timeout: float, margin: float = 1.0
) -> list[Any]:
    """One pull fetch that cannot hang: the server-side expiry is `timeout`, and an outer
    deadline of timeout + margin covers a server that never answers. Nothing there: []."""
    try:
        return list(await asyncio.wait_for(psub.fetch(batch, timeout=timeout), timeout + margin))
    except (TimeoutError, nats.errors.TimeoutError):
        return []
