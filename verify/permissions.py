"""What an application user of the account may and may not do, tried for real and harmlessly.

Every probe is a request the CIM's client makes (allowed) or one that would destroy the store
(refused). The refused ones are written so that even a server that wrongly allowed them would do
no harm: STREAM.DELETE and CONSUMER.DELETE carry a payload (the server refuses a non-empty delete
request, 10038), the purge filter matches nothing, the message to delete does not exist, create
and update name another stream than their subject (10056). The allowed appends carry an
expectation no subject can meet, so the stream answers and stores nothing. A refusal is the
server's "Permissions Violation for Publish to ..." (nats-py hands it to error_cb; the connection
stays up), observed after a flush, so no probe waits for a timeout.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import nats

from verify.client import connect_tls_or_nothing

# nats-py lowers the case of the server's -ERR text.
VIOLATION = "permissions violation for publish to"
# How long a probe nothing answers (an ack) waits for a violation that trails the flush.
UNANSWERED_GRACE = 0.3
# A sequence no subject reaches: an append expecting it is refused and stores nothing.
UNREACHABLE_SEQUENCE = str(2**62)


@dataclass(frozen=True)
class Probe:
    what: str
    subject: str
    payload: bytes = b""
    headers: dict[str, str] | None = None
    # Allowed probes that answer: the reply is awaited. Acks and flow control get no reply.
    answered: bool = True


@dataclass
class Outcome:
    probe: Probe
    refused: bool
    answer: str = ""


@dataclass
class Findings:
    """Probes whose outcome was not the expected one, in words."""

    wrongly_refused: list[str] = field(default_factory=list)
    wrongly_allowed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.wrongly_refused and not self.wrongly_allowed


def _probe_subject(publish: Iterable[str], run: str) -> str | None:
    """A subject the client may publish to, in a verify-only corner of it."""
    for pattern in publish:
        tokens = pattern.split(".")
        if tokens[-1] == ">":
            return ".".join([*(t if t != "*" else "verify" for t in tokens[:-1]), "verify-probe", run, "refused"])
        if "*" in tokens:
            return ".".join(t if t != "*" else f"verify-probe-{run}" for t in tokens)
    return None


def allowed_probes(stream: str, publish: Iterable[str], run: str) -> list[Probe]:
    """What the CIM's client does on `stream`, in the order it does it (a consumer of its own is
    created, read, acked, looked up and deleted)."""
    consumer = f"verify-{run}"
    probes = [
        Probe("account info", "$JS.API.INFO"),
        Probe("stream info", f"$JS.API.STREAM.INFO.{stream}"),
        Probe(
            "create its own consumer",
            f"$JS.API.CONSUMER.CREATE.{stream}.{consumer}",
            json.dumps(
                {
                    "stream_name": stream,
                    # Ephemeral (no durable name): the server removes it 5 s after its last use
                    # even if the delete below never happens.
                    "config": {"name": consumer, "ack_policy": "explicit", "filter_subject": f"verify-probe.{run}.>"},
                }
            ).encode(),
        ),
        Probe("consumer info", f"$JS.API.CONSUMER.INFO.{stream}.{consumer}"),
        Probe(
            "fetch",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
            json.dumps({"batch": 1, "no_wait": True}).encode(),
        ),
        Probe("ack", f"$JS.ACK.{stream}.{consumer}.1.1.1.0.0", b"+ACK", answered=False),
        Probe(
            "direct get", f"$JS.API.DIRECT.GET.{stream}", json.dumps({"last_by_subj": f"verify-probe.{run}"}).encode()
        ),
        Probe("delete its own consumer", f"$JS.API.CONSUMER.DELETE.{stream}.{consumer}"),
    ]
    subject = _probe_subject(publish, run)
    if subject:
        expect = {"Nats-Expected-Last-Subject-Sequence": UNREACHABLE_SEQUENCE}
        probes += [
            Probe("append", subject, b"{}", expect),
            Probe(
                "atomic batch append",
                subject,
                b"{}",
                expect | {"Nats-Batch-Id": run, "Nats-Batch-Sequence": "1", "Nats-Batch-Commit": "1"},
            ),
        ]
    return probes


def refused_probes(stream: str, run: str, declared_consumers: Iterable[str] = ()) -> list[Probe]:
    """What would destroy the store, in harmless form (see the module's docstring)."""
    mismatch = json.dumps({"name": f"VERIFY_MISMATCH_{run}"}).encode()
    not_empty = b'{"verify": "a non-empty delete request, which the server refuses"}'
    return [
        Probe("stream create", f"$JS.API.STREAM.CREATE.VERIFY_{run}", mismatch),
        Probe("stream update", f"$JS.API.STREAM.UPDATE.{stream}", mismatch),
        Probe("stream delete", f"$JS.API.STREAM.DELETE.{stream}", not_empty),
        Probe("stream purge", f"$JS.API.STREAM.PURGE.{stream}", json.dumps({"filter": f"verify-probe.{run}"}).encode()),
        Probe("message delete", f"$JS.API.STREAM.MSG.DELETE.{stream}", json.dumps({"seq": 2**62}).encode()),
        *(
            Probe(f"delete declared consumer {name}", f"$JS.API.CONSUMER.DELETE.{stream}.{name}", not_empty)
            for name in declared_consumers
        ),
    ]


def _violated(probe: Probe, violations: list[str]) -> bool:
    return any(VIOLATION in v.lower() and f'"{probe.subject.lower()}"' in v.lower() for v in violations)


async def attempt(nc: Any, probes: list[Probe], violations: list[str], seconds: float) -> list[Outcome]:
    """Each probe in turn (they build on each other); refused = the server reported a violation."""
    outcomes = []
    for probe in probes:
        before = len(violations)
        answer = ""
        try:
            if probe.answered:
                reply = await nc.request(probe.subject, probe.payload, timeout=seconds, headers=probe.headers)
                answer = (reply.headers or {}).get("Status", "") + reply.data.decode(errors="replace")[:200]
            else:
                await nc.publish(probe.subject, probe.payload, headers=probe.headers)
            await nc.flush(timeout=seconds)
        except (nats.errors.TimeoutError, TimeoutError):
            answer = "no answer"
        except nats.errors.NoRespondersError:
            answer = "no responders"
        refused = _violated(probe, violations[before:])
        if not refused and not probe.answered:
            # Nothing answers an ack: only a violation can tell, and it can trail the flush.
            await asyncio.sleep(UNANSWERED_GRACE)
            refused = _violated(probe, violations[before:])
        if not refused and answer == "no answer":
            # A refused request gets no reply; its violation can trail the timeout by a flush.
            await nc.flush(timeout=seconds)
            refused = _violated(probe, violations[before:])
        outcomes.append(Outcome(probe, refused, answer))
    return outcomes


async def attempt_refused(nc: Any, probes: list[Probe], violations: list[str], seconds: float) -> list[Outcome]:
    """All at once: each is published with a reply subject; then each is waited for until it is
    either refused (the server's violation) or answered (let through: JetStream answers every one
    of these, with an error). The violation can trail the flush's PONG (seen on the lab), so the
    flush alone decides nothing."""
    inbox = nc.new_inbox()
    answers: dict[str, str] = {}

    async def collect(message: Any) -> None:
        answers[message.subject.rsplit(".", 1)[1]] = message.data.decode(errors="replace")[:200]

    sub = await nc.subscribe(f"{inbox}.*", cb=collect)
    before = len(violations)
    for index, probe in enumerate(probes):
        await nc.publish(probe.subject, probe.payload, reply=f"{inbox}.{index}", headers=probe.headers)
    await nc.flush(timeout=seconds)
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        refused = [_violated(p, violations[before:]) for p in probes]
        settled = all(r or str(i) in answers for i, r in enumerate(refused))
        if settled or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.02)
    await sub.unsubscribe()
    return [
        Outcome(p, r, answers.get(str(i), "neither refused nor answered"))
        for i, (p, r) in enumerate(zip(probes, refused, strict=True))
    ]


async def check_client(
    servers: list[str],
    login: dict[str, Any],
    stream: str,
    publish: Iterable[str],
    declared_consumers: Iterable[str] = (),
    *,
    seconds: float = 1.0,
) -> Findings:
    """Connects as the application user and tries both lists; what went the wrong way is returned."""
    violations: list[str] = []

    async def note(error: Exception) -> None:
        violations.append(str(error))

    run = uuid.uuid4().hex[:8]
    nc = await connect_tls_or_nothing(
        servers=servers,
        name="nats-verify-permissions",
        connect_timeout=seconds * 2,
        max_reconnect_attempts=1,
        # nats-py's default (2 s) is waited out for each refusing server before its second try.
        reconnect_time_wait=0.1,
        error_cb=note,
        **login,
    )
    findings = Findings()
    try:
        for outcome in await attempt(nc, allowed_probes(stream, publish, run), violations, seconds):
            if outcome.refused or outcome.answer in ("no answer", "no responders"):
                findings.wrongly_refused.append(
                    f"{outcome.probe.what} ({outcome.probe.subject}: {outcome.answer or 'refused'})"
                )
        probes = refused_probes(stream, run, declared_consumers)
        for outcome in await attempt_refused(nc, probes, violations, seconds):
            if not outcome.refused:
                findings.wrongly_allowed.append(
                    f"{outcome.probe.what} ({outcome.probe.subject}; the server answered {outcome.answer!r})"
                )
    finally:
        await nc.close()
    return findings


def run_check(*args: Any, deadline: float = 8.0, **kwargs: Any) -> Findings:
    return asyncio.run(asyncio.wait_for(check_client(*args, **kwargs), deadline))
