"""The staleness rules of the jetstream_consumers module (plugins/module_utils), without a server:
each rule alone keeps a consumer, the idle boundary is exact, the pattern restricts, a consumer
declared in the inventory is never stale; the table and the totals line say every figure."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import load_module_util

staleness = load_module_util("jetstream_consumer_staleness")
NANOS: int = staleness.NANOS
Consumer, Rules, classify, table = staleness.Consumer, staleness.Rules, staleness.classify, staleness.table
Counts, totals = staleness.Counts, staleness.totals
human_duration, parse_time = staleness.human_duration, staleness.parse_time

HOUR = 3600 * NANOS
NOW = parse_time("2026-03-01T12:00:00Z") or 0
RULES = Rules(stale_after=HOUR)


def leaked(**changes: Any) -> Any:
    """A consumer created 2 h before NOW, never used: stale under RULES."""
    base = Consumer(
        stream="EVENTS",
        name="leak-1",
        durable=True,
        created=NOW - 2 * HOUR,
        last_delivered=None,
        last_acked=None,
        num_pending=0,
        num_ack_pending=0,
        num_waiting=0,
        push_bound=False,
    )
    return dataclasses.replace(base, **changes)


def test_leaked_consumer_is_stale() -> None:
    verdict = classify(leaked(), RULES, NOW)
    assert verdict.stale
    assert verdict.reason == "idle 2h > 1h, nothing pending"
    assert verdict.idle == 2 * HOUR


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"num_pending": 3}, "3 pending"),
        ({"num_ack_pending": 1}, "1 awaiting ack"),
        ({"num_waiting": 2}, "2 waiting pulls"),
        ({"num_waiting": 1}, "1 waiting pull"),
        ({"push_bound": True}, "push bound"),
        ({"last_delivered": NOW - 12 * NANOS}, "active 12s ago"),
        ({"last_acked": NOW - 90 * NANOS}, "active 1m30s ago"),
        ({"created": NOW - 5 * 60 * NANOS}, "active 5m ago"),
    ],
)
def test_each_rule_alone_keeps_the_consumer(changes: dict[str, Any], reason: str) -> None:
    verdict = classify(leaked(**changes), RULES, NOW)
    assert not verdict.stale
    assert verdict.reason == reason


def test_all_reasons_are_named() -> None:
    verdict = classify(leaked(num_pending=3, num_waiting=2, push_bound=True), Rules(HOUR, "tmp-*"), NOW)
    assert verdict.reason == "name does not match 'tmp-*'; push bound; 2 waiting pulls; 3 pending"


def test_a_declared_consumer_is_never_stale() -> None:
    declared = Rules(HOUR, protected=frozenset({"EVENTS/leak-1"}))
    verdict = classify(leaked(), declared, NOW)
    assert not verdict.stale and verdict.reason == "declared in the inventory" and verdict.idle == 2 * HOUR
    assert classify(leaked(num_pending=2), declared, NOW).reason == "declared in the inventory; 2 pending"
    # By stream and name: the same name on another stream is not declared.
    assert classify(leaked(stream="OTHER"), declared, NOW).stale
    assert classify(leaked(name="leak-10"), declared, NOW).stale


def test_boundary_is_strictly_longer_than_stale_after() -> None:
    exactly = leaked(created=NOW - HOUR)
    assert not classify(exactly, RULES, NOW).stale
    assert classify(exactly, RULES, NOW + 1).stale  # one nanosecond more


def test_latest_activity_counts() -> None:
    # Old creation and delivery, but an ack 10 minutes ago: live.
    consumer = leaked(created=NOW - 9 * HOUR, last_delivered=NOW - 3 * HOUR, last_acked=NOW - 600 * NANOS)
    verdict = classify(consumer, RULES, NOW)
    assert not verdict.stale and verdict.idle == 600 * NANOS


def test_server_clock_wins_over_the_callers() -> None:
    # The server says it is only 30 min after creation; a controller clock hours ahead does not matter.
    consumer = leaked(created=NOW - HOUR // 2, observed=NOW)
    assert not classify(consumer, RULES, NOW + 10 * HOUR).stale


def test_no_times_at_all_is_not_stale() -> None:
    assert not classify(leaked(created=None), RULES, NOW).stale


@pytest.mark.parametrize(
    ("pattern", "stale"),
    [("leak-*", True), ("leak-?", True), ("LEAK-*", False), ("tmp-*", False), ("*", True)],
)
def test_name_pattern(pattern: str, stale: bool) -> None:
    assert classify(leaked(), Rules(HOUR, pattern), NOW).stale is stale


@given(
    idle=st.integers(0, 10 * HOUR),
    stale_after=st.integers(1, 10 * HOUR),
    pending=st.integers(0, 3),
    ack_pending=st.integers(0, 3),
    waiting=st.integers(0, 3),
    bound=st.booleans(),
)
def test_stale_exactly_when_every_rule_holds(
    *, idle: int, stale_after: int, pending: int, ack_pending: int, waiting: int, bound: bool
) -> None:
    consumer = leaked(
        created=NOW - idle, num_pending=pending, num_ack_pending=ack_pending, num_waiting=waiting, push_bound=bound
    )
    verdict = classify(consumer, Rules(stale_after), NOW)
    expected = idle > stale_after and not (pending or ack_pending or waiting or bound)
    assert verdict.stale is expected
    assert verdict.reason


def test_from_api_reads_the_servers_json() -> None:
    # Shape as nats-server 2.15 answers CONSUMER.INFO: last_active absent until used, push_bound
    # absent when false.
    info = {
        "stream_name": "EVENTS",
        "name": "worker",
        "created": "2026-03-01T10:00:00.123456789Z",
        "config": {"durable_name": "worker", "ack_policy": "explicit"},
        "delivered": {"consumer_seq": 1, "stream_seq": 1, "last_active": "2026-03-01T11:00:00.5Z"},
        "ack_floor": {"consumer_seq": 0, "stream_seq": 0},
        "num_ack_pending": 1,
        "num_waiting": 0,
        "num_pending": 2,
        "ts": "2026-03-01T12:00:00Z",
    }
    consumer = Consumer.from_api(info)
    assert consumer.durable and not consumer.push_bound
    assert consumer.created == NOW - 2 * HOUR + 123456789
    assert consumer.last_delivered == NOW - HOUR + NANOS // 2
    assert consumer.last_acked is None
    assert consumer.observed == NOW
    assert classify(consumer, RULES, 0).reason == "2 pending; 1 awaiting ack; active 59m59s ago"
    ephemeral = Consumer.from_api(info | {"config": {"ack_policy": "explicit"}, "push_bound": True})
    assert not ephemeral.durable and ephemeral.push_bound


def test_parse_time() -> None:
    assert parse_time(None) is None
    assert parse_time("0001-01-01T00:00:00Z") is None  # Go's zero time
    assert parse_time("1970-01-01T01:00:01.000000001+01:00") == NANOS + 1
    with pytest.raises(ValueError, match="not an RFC 3339 time"):
        parse_time("yesterday")


def test_human_duration() -> None:
    assert [human_duration(n * NANOS) for n in (0, 12, 90, 3600, 7380, 3 * 86400 + 4 * 3600 + 5)] == [
        "0ms",
        "12s",
        "1m30s",
        "1h",
        "2h3m",
        "3d4h",
    ]


def test_table_lists_the_stale_with_what_was_done() -> None:
    stale = classify(leaked(name="leak-10"), RULES, NOW)
    also = classify(leaked(name="leak-2", durable=False), RULES, NOW)
    third = classify(leaked(name="leak-3"), RULES, NOW)
    live = classify(leaked(name="worker", num_pending=1), RULES, NOW)
    lines = table([stale, also, third, live], {"EVENTS/leak-10": "deleted", "EVENTS/leak-2": "kept on recheck"})
    assert lines[0].split() == ["STREAM", "CONSUMER", "KIND", "IDLE", "ACTION"]
    assert lines[1].split() == ["EVENTS", "leak-10", "durable", "2h", "deleted"]
    assert lines[2].split() == ["EVENTS", "leak-2", "ephemeral", "2h", "kept", "on", "recheck"]
    assert lines[3].split() == ["EVENTS", "leak-3", "durable", "2h", "-"]
    assert lines[0].index("KIND") == lines[1].index("durable") == lines[2].index("ephemeral")
    assert len(lines) == 4
    assert table([live]) == []


def test_totals_say_every_figure() -> None:
    clean = Counts(streams=1, names=5, seen=5, stale=2)
    assert totals(clean) == (
        "5 consumers in 1 stream: 5 seen, 0 not seen; 2 stale (report only: none deleted); "
        "0 declared in the inventory (never deleted)"
    )
    assert totals(Counts(streams=1, names=1, seen=1, stale=1, deleted=1), "check").startswith(
        "1 consumer in 1 stream: 1 seen, 0 not seen; 1 stale: 1 would be deleted, 0 kept on recheck;"
    )
    rough = Counts(
        streams=3,
        names=1024,
        seen=620,
        unseen=401,
        gone=3,
        stale=600,
        deleted=590,
        kept_on_recheck=4,
        gone_before_deletion=5,
        failed=1,
        declared=3,
    )
    assert totals(rough, "delete") == (
        "1024 consumers in 3 streams: 620 seen, 401 not seen, 3 gone before they were seen; "
        "600 stale: 590 deleted, 4 kept on recheck, 5 gone before deletion, 1 failed; "
        "3 declared in the inventory (never deleted)"
    )
