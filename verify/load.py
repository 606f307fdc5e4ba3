"""Continuous publishing to an R3 stream while something disruptive runs (a rolling change, a
restart, a remediation), and the accounting afterwards: every acked message must be readable.

Used by the lab tests and the benchmarks; it never touches application streams, only the probe
stream it is given (created R3, deleted by `close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client
from nats.js.api import StorageType, StreamConfig
from nats.js.client import JetStreamContext

from verify.client import connect_tls_or_nothing
from verify.inventory import Cluster

# Errors worth retrying while a node restarts or a leader moves: timeouts, no responders / no
# stream response, 10008 "JetStream system temporarily unavailable" and other API errors, a
# connection being re-established. All are nats.errors.Error subclasses.
RETRYABLE = (nats.errors.Error, TimeoutError)


@dataclass
class PublishTally:
    attempted: int = 0
    acked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)


async def connect(cluster: Cluster, name: str) -> Client:
    """A client that keeps reconnecting (it rides through restarts), as the application user; TLS
    or nothing, and a cluster where no server offers TLS is refused at once, not retried forever."""
    return await connect_tls_or_nothing(
        servers=cluster.client_urls,
        name=name,
        connect_timeout=2,
        reconnect_time_wait=0.2,
        max_reconnect_attempts=-1,
        allow_reconnect=True,
        ping_interval=2,
        max_outstanding_pings=2,
        **cluster.login(),
    )


async def ensure_probe_stream(js: JetStreamContext, stream: str, subject: str, replicas: int = 3) -> None:
    config = StreamConfig(
        name=stream,
        subjects=[f"{subject}.>"],
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=120.0,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            await js.add_stream(config)
            return
        except RETRYABLE:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def publish_until(
    js: JetStreamContext,
    subject: str,
    stop: asyncio.Event | threading.Event,
    tally: PublishTally,
    *,
    interval: float = 0.02,
    attempts: int = 40,
) -> None:
    """Publishes numbered messages until `stop`, each retried (same Nats-Msg-Id, so no
    duplicates) until acked or `attempts` run out."""
    number = 0
    while not stop.is_set():
        number += 1
        msg_id = f"m{number:07d}"
        tally.attempted += 1
        for attempt in range(attempts):
            try:
                await js.publish(f"{subject}.n", msg_id.encode(), timeout=2, headers={"Nats-Msg-Id": msg_id})
                tally.acked.append(msg_id)
                break
            except RETRYABLE as error:
                kind = type(error).__name__
                tally.errors[kind] = tally.errors.get(kind, 0) + 1
                tally.retries += 1
                await asyncio.sleep(min(0.1 * (attempt + 1), 1.0))
        else:
            tally.failed.append(msg_id)
        await asyncio.sleep(interval)


async def stored_ids(js: JetStreamContext, stream: str, subject: str) -> list[str]:
    """Every payload in the stream, read with an ordered consumer until nothing is pending."""
    ids: list[str] = []
    info = await js.stream_info(stream)
    if info.state.messages == 0:
        return ids
    sub = await js.subscribe(f"{subject}.>", ordered_consumer=True, stream=stream)
    try:
        while True:
            msg = await sub.next_msg(timeout=5)
            ids.append(msg.data.decode())
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return ids


class BackgroundPublisher:
    """Runs publish_until in a thread with its own event loop, for use around a blocking call."""

    def __init__(self, cluster: Cluster, stream: str = "LAB_PROBE_ROLL", subject: str = "labprobe.roll") -> None:
        self.cluster = cluster
        self.stream = stream
        self.subject = subject
        self.tally = PublishTally()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # reported by stop()
            self._error = error
            self._ready.set()

    async def _main(self) -> None:
        nc = await connect(self.cluster, "lab-publisher")
        try:
            js = nc.jetstream(timeout=5)
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(self.stream)
            await ensure_probe_stream(js, self.stream, self.subject)
            self._ready.set()
            await publish_until(js, self.subject, self._stop, self.tally)
        finally:
            await nc.close()

    def __enter__(self) -> BackgroundPublisher:
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("publisher did not get its probe stream within 60 s")
        if self._error:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        if self._error:
            raise self._error

    def audit(self) -> tuple[list[str], list[str]]:
        """(acked but not stored, stored twice), then the probe stream is deleted."""
        return asyncio.run(self._audit())

    async def _audit(self) -> tuple[list[str], list[str]]:
        nc = await connect(self.cluster, "lab-auditor")
        try:
            js = nc.jetstream(timeout=5)
            stored = await stored_ids(js, self.stream, self.subject)
            missing = sorted(set(self.tally.acked) - set(stored))
            duplicated = sorted(i for i, count in Counter(stored).items() if count > 1)
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(self.stream)
            return missing, duplicated
        finally:
            await nc.close()
