"""Which JetStream consumers are stale (leaked): the rules behind the `jetstream_consumers` module.

A consumer is stale only if every rule holds: not declared in the inventory, idle longer than
`stale_after`, nothing pending, nothing awaiting an ack, no waiting pull requests, not bound to a
push subscriber, and (when a pattern is given) a name matching it. Consumers come in as the JetStream API's own JSON (a
CONSUMER.INFO answer or one entry of CONSUMER.LIST); times are integer nanoseconds since the epoch
so the boundary is exact. Plain Python, no NATS or Ansible imports.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any

NANOS = 1_000_000_000
DECLARED = "declared in the inventory"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)", re.IGNORECASE)


def parse_time(value: Any) -> int | None:
    """An RFC 3339 time as the server writes it (nanosecond fraction) -> ns since the epoch.
    None for absent or Go's zero time (the server's way of saying "never")."""
    if not value:
        return None
    match = _RFC3339.fullmatch(str(value).strip())
    if not match:
        raise ValueError(f"not an RFC 3339 time: {value!r}")
    zone = "+00:00" if match.group(3).upper() == "Z" else match.group(3)
    moment = datetime.fromisoformat(match.group(1) + zone)
    delta = moment - _EPOCH
    whole = delta.days * 86400 + delta.seconds
    if whole < 0:  # Go zero time (year 1)
        return None
    return whole * NANOS + int((match.group(2) or "0").ljust(9, "0"))


def human_duration(nanos: int) -> str:
    """12s, 1m30s, 2h, 3d4h: the two largest units, for reasons and tables."""
    if nanos < NANOS:
        return f"{max(nanos, 0) // 1_000_000}ms"
    seconds = nanos // NANOS
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts[:2])


@dataclass(frozen=True)
class Consumer:
    """The facts about one consumer that staleness depends on."""

    stream: str
    name: str
    durable: bool
    created: int | None
    last_delivered: int | None
    last_acked: int | None
    num_pending: int
    num_ack_pending: int
    num_waiting: int
    push_bound: bool
    # The server's clock when it answered (`ts`, servers >= 2.10): idle is measured on it, so a
    # controller whose clock is off does not shift the verdict.
    observed: int | None = None

    @classmethod
    def from_api(cls, info: Mapping[str, Any]) -> Consumer:
        config = info.get("config") or {}
        delivered = info.get("delivered") or {}
        ack_floor = info.get("ack_floor") or {}
        return cls(
            stream=str(info.get("stream_name", "")),
            name=str(info.get("name", "")),
            durable=bool(config.get("durable_name")),
            created=parse_time(info.get("created")),
            last_delivered=parse_time(delivered.get("last_active")),
            last_acked=parse_time(ack_floor.get("last_active")),
            num_pending=int(info.get("num_pending") or 0),
            num_ack_pending=int(info.get("num_ack_pending") or 0),
            num_waiting=int(info.get("num_waiting") or 0),
            # The server leaves push_bound out when false.
            push_bound=bool(info.get("push_bound")),
            observed=parse_time(info.get("ts")),
        )

    @property
    def label(self) -> str:
        return f"{self.stream}/{self.name}"

    @property
    def last_active(self) -> int | None:
        """The latest sign of life: creation, last delivery or last ack."""
        moments = [t for t in (self.created, self.last_delivered, self.last_acked) if t is not None]
        return max(moments) if moments else None


@dataclass(frozen=True)
class Rules:
    stale_after: int  # nanoseconds
    name_pattern: str | None = None
    # STREAM/NAME of consumers declared in the inventory: never stale, whatever their state.
    protected: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Verdict:
    consumer: Consumer
    stale: bool
    reason: str
    idle: int  # nanoseconds

    def as_dict(self) -> dict[str, Any]:
        c = self.consumer
        return {
            "stream": c.stream,
            "name": c.name,
            "durable": c.durable,
            "idle_seconds": round(self.idle / NANOS, 3),
            "num_pending": c.num_pending,
            "num_ack_pending": c.num_ack_pending,
            "num_waiting": c.num_waiting,
            "push_bound": c.push_bound,
            "stale": self.stale,
            "reason": self.reason,
        }


def classify(consumer: Consumer, rules: Rules, now: int) -> Verdict:
    """Stale or not, with every reason that keeps it (or the one that condemns it) in words.
    `now` is used only when the server gave no `ts`."""
    clock = consumer.observed if consumer.observed is not None else now
    last = consumer.last_active
    # No time at all is not proof of idleness: count it as just active.
    idle = max(clock - last, 0) if last is not None else 0
    keep = []
    if consumer.label in rules.protected:
        keep.append(DECLARED)
    if rules.name_pattern is not None and not fnmatchcase(consumer.name, rules.name_pattern):
        keep.append(f"name does not match {rules.name_pattern!r}")
    if consumer.push_bound:
        keep.append("push bound")
    if consumer.num_waiting:
        keep.append(f"{consumer.num_waiting} waiting pull{'s' if consumer.num_waiting != 1 else ''}")
    if consumer.num_pending:
        keep.append(f"{consumer.num_pending} pending")
    if consumer.num_ack_pending:
        keep.append(f"{consumer.num_ack_pending} awaiting ack")
    # Strictly longer: idle exactly stale_after is still live.
    if idle <= rules.stale_after:
        keep.append(f"active {human_duration(idle)} ago")
    if keep:
        return Verdict(consumer, False, "; ".join(keep), idle)
    reason = f"idle {human_duration(idle)} > {human_duration(rules.stale_after)}, nothing pending"
    return Verdict(consumer, True, reason, idle)


def table(verdicts: Iterable[Verdict], actions: Mapping[str, str] | None = None) -> list[str]:
    """Fixed-width lines listing the stale consumers (none: no lines), for a playbook to print.
    `actions` says what was done to each, by STREAM/NAME ("deleted", "kept on recheck" ...)."""
    done = actions or {}
    stale = sorted((v for v in verdicts if v.stale), key=lambda v: (v.consumer.stream, v.consumer.name))
    if not stale:
        return []
    rows = [("STREAM", "CONSUMER", "KIND", "IDLE", "ACTION")]
    for v in stale:
        c = v.consumer
        kind = "durable" if c.durable else "ephemeral"
        rows.append((c.stream, c.name, kind, human_duration(v.idle), done.get(c.label, "-")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


@dataclass(frozen=True)
class Counts:
    """The figures of one run. Every consumer listed by name is seen (its info read), not seen,
    or gone before its info could be read: names == seen + unseen + gone. Every stale one is
    deleted, kept on recheck, gone before deletion or failed (when deleting)."""

    streams: int
    names: int
    seen: int
    listed: int = 0  # of the seen, those the list API returned (the rest were asked for one by one)
    unseen: int = 0
    gone: int = 0
    stale: int = 0
    deleted: int = 0
    kept_on_recheck: int = 0
    gone_before_deletion: int = 0
    failed: int = 0
    declared: int = 0


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def totals(c: Counts, mode: str = "report") -> str:
    """One line with every figure of the run; `mode` is report, check (would delete) or delete."""
    looked = f"{_count(c.names, 'consumer')} in {_count(c.streams, 'stream')}: {c.seen} seen, {c.unseen} not seen"
    if c.gone:
        looked += f", {c.gone} gone before they were seen"
    if mode == "report":
        done = f"{c.stale} stale (report only: none deleted)"
    else:
        done = f"{c.stale} stale: {c.deleted} {'would be deleted' if mode == 'check' else 'deleted'}"
        done += f", {c.kept_on_recheck} kept on recheck"
        if c.gone_before_deletion:
            done += f", {c.gone_before_deletion} gone before deletion"
        if c.failed:
            done += f", {c.failed} failed"
    return f"{looked}; {done}; {c.declared} {DECLARED} (never deleted)"
