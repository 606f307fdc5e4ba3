"""The declared-stream reading shared by the module, the preflight and verify: sizes, durations,
the keep-every-event defaults, what the server refuses or rewrites, destructive changes, and the
declaration-wide problems including the JetStream limits (pure logic, no server)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.helpers import load_module_util

spec = load_module_util("jetstream_stream_spec")
EVENT_STORE: dict[str, Any] = {"name": "EVENTS", "subjects": ["events.>"], "storage": "file", "replicas": 3}
GB = 1 << 30
SECOND = spec.NANOS
# The lab's and phx's limits (roles/nats_server/defaults, inventory/phx/group_vars).
ACCOUNT = {"max_memory": "3GB", "max_file": "48GB", "max_streams": 64, "max_consumers": 4096}
NODES = [
    {
        "host": f"nats-{n}",
        "nats_server_jetstream_max_file_store": "16GB",
        "nats_server_jetstream_max_memory_store": "1GB",
    }
    for n in (1, 2, 3)
]
SIZED = EVENT_STORE | {"max_bytes": "10GB"}
FAST = settings(max_examples=200, deadline=None)


def problems(streams: Any, account: Any = ACCOUNT, nodes: Any = NODES) -> list[str]:
    found: list[str] = spec.declaration_problems(streams, 3, account, nodes)
    return found


def refusal(declared: dict[str, Any]) -> str:
    with pytest.raises(spec.DeclarationError) as raised:
        spec.desired_config(declared)
        spec.declared_consumers(declared, spec.desired_config(declared))
    return str(raised.value)


# Durations and sizes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("1m", 60), ("1m30s", 90), ("2h", 7200), ("1d", 86400), ("500ms", 0.5), (90, 90)]
)
def test_durations(text: Any, seconds: float) -> None:
    assert spec.parse_duration(text) == int(seconds * spec.NANOS)


BAD_DURATIONS = [
    "-5s",
    "5",
    "1x",
    "",
    "1m-30s",
    "9999999999999d",
    -1,
    "5 minutes",
    "1h 30m",
    "m",
    "10y",
    "1.5.5s",
    True,
]


@pytest.mark.parametrize("text", BAD_DURATIONS)
def test_bad_durations(text: Any) -> None:
    with pytest.raises(ValueError):
        spec.parse_duration(text)


@given(st.integers(min_value=0, max_value=spec.INT64_MAX))
@example(0)
@example(90 * SECOND)
@example(30 * 86400 * SECOND + 1)
@FAST
def test_a_shown_duration_reads_back_exactly(nanos: int) -> None:
    """Messages show durations as the inventory writes them, never as nanoseconds."""
    shown = spec.human_duration(nanos)
    assert spec.parse_duration(shown) == nanos
    assert not re.search(r"[0-9]{10}", shown), shown


BAD_SIZES = ["99999999999T", "-2", "10 gigs", "-1GB", "1.5GB", "GB", "", "ten", None]


@pytest.mark.parametrize("text", BAD_SIZES)
def test_bad_sizes(text: Any) -> None:
    with pytest.raises(ValueError):
        spec.parse_size(text)


@given(st.integers(min_value=0, max_value=1 << 50))
@FAST
def test_a_shown_size_is_exact_when_it_divides(number: int) -> None:
    shown = spec.human_size(number)
    if "." not in shown:
        assert spec.parse_size(shown) == number
    else:  # 1.5GB and the like: within a tenth of the unit
        unit = spec.parse_size("1" + shown[-2:])
        assert abs(float(shown[:-2]) * unit - number) <= unit / 10


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("16G", 16 * 10**9),
        ("16GB", 16 * GB),
        ("1K", 1000),
        ("1KB", 1024),
        ("512MiB", 512 << 20),
        ("1024", 1024),
        (7, 7),
    ],
)
def test_server_config_sizes_are_read_as_nats_server_reads_them(text: Any, number: int) -> None:
    """conf/parse.go: K, M, G, T without B are 1000-based; with B (or i, iB) 1024-based."""
    assert spec.parse_server_size(text) == number


# Keep every event ----------------------------------------------------------------------------


def test_an_undeclared_deletion_key_gets_the_keep_every_event_value() -> None:
    config = spec.desired_config(EVENT_STORE)
    assert config["max_age"] == 0 and config["discard"] == "new"
    assert config["deny_delete"] and config["deny_purge"] and not config["allow_rollup_hdrs"]
    assert config["consumer_limits.inactive_threshold"] == 0
    assert spec.event_deletion(config) == []


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"max_age": "30d"}, "max_age deletes events"),
        ({"max_bytes": "1GB", "discard": "old"}, "max_bytes with discard old"),
        ({"max_msgs": 10, "discard": "old"}, "max_msgs with discard old"),
        # The server removes a subject's oldest beyond the count whatever the discard policy.
        ({"max_msgs_per_subject": 1}, "max_msgs_per_subject deletes a subject's oldest events"),
        ({"max_msgs_per_subject": 1, "discard": "old"}, "max_msgs_per_subject deletes"),
        ({"retention": "workqueue"}, "retention workqueue"),
        ({"retention": "interest"}, "retention interest"),
        ({"allow_rollup": True, "deny_purge": False}, "allow_rollup"),
        ({"deny_delete": False}, "deny_delete false"),
        ({"deny_purge": False}, "deny_purge false"),
    ],
)
def test_a_deleting_declaration_needs_the_explicit_key(extra: dict[str, Any], words: str) -> None:
    with pytest.raises(spec.DeclarationError, match=words):
        spec.desired_config(EVENT_STORE | extra)
    assert spec.desired_config(EVENT_STORE | extra | {"deletes_old_events": True})["name"] == "EVENTS"


@pytest.mark.parametrize("extra", [{"max_bytes": "1GB"}, {"max_msgs": 5}, {"max_bytes": "1GB", "discard": "new"}])
def test_a_limit_with_discard_new_deletes_nothing(extra: dict[str, Any]) -> None:
    assert spec.event_deletion(spec.desired_config(EVENT_STORE | extra)) == []


# The server's rewrites compare equal to their declared spelling -----------------------------------

# The config the server returns for EVENT_STORE with the keep-every-event defaults (nats-server 2.15.1).
SERVER_CONFIG: dict[str, Any] = {
    "name": "EVENTS",
    "subjects": ["events.>"],
    "storage": "file",
    "num_replicas": 3,
    "retention": "limits",
    "discard": "new",
    "max_bytes": -1,
    "max_msgs": -1,
    "max_msgs_per_subject": -1,
    "max_msg_size": -1,
    "max_consumers": -1,
    "max_age": 0,
    "duplicate_window": 120 * SECOND,
    "deny_delete": True,
    "deny_purge": True,
    "allow_rollup_hdrs": False,
    "consumer_limits": {},
}


@pytest.mark.parametrize(
    "declared",
    [
        {"max_bytes": 0},
        {"max_bytes": -1},
        {"max_msgs": 0},
        {"max_msgs_per_subject": 0},
        {"max_msg_size": 0},
        {"max_consumers": 0},
        {"max_age": 0},
        {"max_age": "0s"},
        {"duplicate_window": 0},
        {"duplicate_window": "2m"},
        {"description": ""},
        {"consumer_inactive_threshold": 0},
        {"allow_direct": False, "allow_atomic": False},
    ],
)
def test_a_server_default_equals_its_declared_spelling(declared: dict[str, Any]) -> None:
    """The server leaves out or rewrites what is unlimited or defaulted: no change is reported for it."""
    assert spec.changes(SERVER_CONFIG, spec.desired_config(EVENT_STORE | declared)) == {}


def test_a_zero_duplicate_window_is_what_the_server_stores() -> None:
    assert spec.desired_config(EVENT_STORE | {"duplicate_window": 0})["duplicate_window"] == 120 * SECOND
    aging = EVENT_STORE | {"duplicate_window": 0, "max_age": "1m", "deletes_old_events": True}
    assert spec.desired_config(aging)["duplicate_window"] == 60 * SECOND


def test_a_changed_value_is_reported() -> None:
    diff = spec.changes(SERVER_CONFIG, spec.desired_config(EVENT_STORE | {"max_bytes": "1GB", "description": "x"}))
    assert diff == {"max_bytes": (-1, GB), "description": ("", "x")}


# What the server refuses, refused first, naming the stream and the key ----------------------------

BAD_DECLARATIONS: list[tuple[Any, str]] = [
    ("INFRA", "a declared stream must be a mapping"),
    (EVENT_STORE | {"name": "infra.events"}, "stream name 'infra.events' must be"),
    (EVENT_STORE | {"name": "EVENTS*"}, "stream name 'EVENTS*'"),
    (EVENT_STORE | {"name": "EVENTS>"}, "stream name 'EVENTS>'"),
    (EVENT_STORE | {"name": "MY EVENTS"}, "stream name 'MY EVENTS'"),
    (EVENT_STORE | {"name": ""}, "stream name ''"),
    (EVENT_STORE | {"name": "E" * 256}, "must be 1-255"),
    (EVENT_STORE | {"name": 7}, "stream name 7"),
    ({"subjects": ["x"], "storage": "file", "replicas": 1}, "stream name None"),
    (EVENT_STORE | {"replicas": "three"}, "stream EVENTS: replicas: not a whole number: 'three'"),
    (EVENT_STORE | {"replicas": 0}, "stream EVENTS: replicas: must be 1 to 5, got 0"),
    (EVENT_STORE | {"replicas": 7}, "must be 1 to 5, got 7"),
    (EVENT_STORE | {"replicas": True}, "replicas: not a whole number: True"),
    (EVENT_STORE | {"storage": "disk"}, "stream EVENTS: storage: 'disk' is not one of ['file', 'memory']"),
    (EVENT_STORE | {"retention": "forever"}, "retention: 'forever' is not one of"),
    (EVENT_STORE | {"discard": "oldest"}, "discard: 'oldest'"),
    (EVENT_STORE | {"subjects": "events.>"}, "subjects: not a list of subjects"),
    (EVENT_STORE | {"subjects": []}, "subjects: not a list of subjects"),
    (EVENT_STORE | {"subjects": ["events..x"]}, "'events..x' is not a subject"),
    (EVENT_STORE | {"subjects": ["events. x"]}, "is not a subject (empty token or white space)"),
    (EVENT_STORE | {"subjects": ["events.>.x"]}, "'>' must be the last token"),
    (EVENT_STORE | {"subjects": ["events*"]}, "wildcards '*' and '>' must be whole tokens"),
    (EVENT_STORE | {"subjects": [">"]}, "'>' would capture every subject"),
    (EVENT_STORE | {"subjects": ["$JS.API.>"]}, "overlaps the NATS API subjects $JS.>"),
    (EVENT_STORE | {"subjects": ["$SYS.x"]}, "overlaps the NATS API subjects $SYS.>"),
    (EVENT_STORE | {"subjects": ["a.>", "a.>"]}, "'a.>' is listed twice"),
    (EVENT_STORE | {"subjects": ["a.>", "a.b"]}, "'a.>' overlaps 'a.b'"),
    (EVENT_STORE | {"sealed": True}, "stream EVENTS: unknown keys ['sealed'] (the keys: docs/streams.md)"),
    (EVENT_STORE | {"max_byte": "1GB"}, "unknown keys ['max_byte'] (did you mean max_bytes?)"),
    (EVENT_STORE | {"max_bytes": "10 gigs"}, "stream EVENTS: max_bytes: not a size: '10 gigs'"),
    (EVENT_STORE | {"max_msgs": -2}, "max_msgs: out of range: -2"),
    (EVENT_STORE | {"max_msgs": "5"}, "max_msgs: not a whole number: '5'"),
    (EVENT_STORE | {"max_age": "30 days", "deletes_old_events": True}, "max_age: not a duration: '30 days' (use e.g."),
    (EVENT_STORE | {"max_age": "50ms", "deletes_old_events": True}, "max_age: 50ms is below the server's 100ms"),
    (EVENT_STORE | {"duplicate_window": "10ms"}, "duplicate_window: 10ms is below the server's 100ms"),
    (
        EVENT_STORE | {"max_age": "1m", "duplicate_window": "5m", "deletes_old_events": True},
        "stream EVENTS: duplicate_window 5m is longer than max_age 1m: the server refuses it",
    ),
    (
        EVENT_STORE | {"allow_rollup": True, "deletes_old_events": True},
        "stream EVENTS: allow_rollup needs deny_purge false",
    ),
    (EVENT_STORE | {"allow_direct": "yes"}, "allow_direct: not true/false: 'yes'"),
    (EVENT_STORE | {"deletes_old_events": "yes"}, "deletes_old_events: not true/false"),
    (EVENT_STORE | {"description": "x" * 5000}, "description: longer than 4096"),
    (EVENT_STORE | {"description": 5}, "description: not a string: 5"),
    (
        EVENT_STORE | {"consumers": {"name": "c"}},
        "stream EVENTS: consumers: must be a list of consumers, got a mapping",
    ),
    (EVENT_STORE | {"consumers": ["projector"]}, "stream EVENTS: consumers: each must be a mapping"),
    (EVENT_STORE | {"consumers": [{"filter_subject": "events.x"}]}, "stream EVENTS: consumer name None"),
    (EVENT_STORE | {"consumers": [{"name": "read.model"}]}, "stream EVENTS: consumer name 'read.model' must be"),
    (EVENT_STORE | {"consumers": [{"name": "read model"}]}, "consumer name 'read model'"),
    (EVENT_STORE | {"consumers": [{"name": "read/model"}]}, "consumer name 'read/model'"),
    (EVENT_STORE | {"consumers": [{"name": "c"}, {"name": "c"}]}, "stream EVENTS: consumer c is declared twice"),
    (
        EVENT_STORE | {"consumers": [{"name": "c", "ackwait": "5m"}]},
        "stream EVENTS: consumer c: unknown keys ['ackwait']",
    ),
    (
        EVENT_STORE | {"consumers": [{"name": "c", "ack_wait": "5 minutes"}]},
        "stream EVENTS: consumer c: ack_wait: not a duration: '5 minutes' (use e.g. 500ms",
    ),
    (EVENT_STORE | {"consumers": [{"name": "c", "ack_policy": "sometimes"}]}, "consumer c: ack_policy: 'sometimes'"),
    (EVENT_STORE | {"consumers": [{"name": "c", "max_deliver": "3"}]}, "consumer c: max_deliver: not a whole number"),
    (EVENT_STORE | {"consumers": [{"name": "c", "filter_subject": "events..x"}]}, "consumer c: filter_subject:"),
    (
        EVENT_STORE | {"consumers": [{"name": "c", "filter_subject": "orders.>"}]},
        "consumer c: filter_subject 'orders.>' matches none of the stream's subjects ['events.>']",
    ),
    (
        EVENT_STORE | {"consumers": [{"name": "c", "deliver_policy": "last_per_subject"}]},
        "consumer c: deliver_policy last_per_subject needs a filter_subject",
    ),
    (
        EVENT_STORE
        | {"retention": "workqueue", "deletes_old_events": True, "consumers": [{"name": "c", "ack_policy": "none"}]},
        "consumer c: ack_policy none: a workqueue stream's consumers must acknowledge",
    ),
    (
        EVENT_STORE | {"consumer_inactive_threshold": "1h", "consumers": [{"name": "c", "inactive_threshold": "2h"}]},
        "consumer c: inactive_threshold 2h is longer than the stream's consumer_inactive_threshold 1h",
    ),
]


@pytest.mark.parametrize(("declared", "words"), BAD_DECLARATIONS, ids=[w for _, w in BAD_DECLARATIONS])
def test_a_declaration_the_server_would_refuse_is_refused_first(declared: Any, words: str) -> None:
    message = refusal(declared)
    assert words in message, message
    assert "\n" not in message and len(message) < 320, message
    # The same problem, through the preflight's reading of the whole declaration.
    assert any(words in p for p in spec.declaration_problems([declared], 3)), words


NAME_ALPHABET = st.characters(codec="ascii", exclude_characters="\x00")


@given(st.text(NAME_ALPHABET, min_size=1, max_size=40))
@example("a.b")
@example("a b")
@example(">")
@FAST
def test_only_letters_digits_dash_and_underscore_make_a_stream_name(name: str) -> None:
    good = re.fullmatch(r"[A-Za-z0-9_-]+", name) is not None
    try:
        spec.desired_config(EVENT_STORE | {"name": name})
    except spec.DeclarationError as error:
        assert not good and f"stream name {name!r}" in str(error)
    else:
        assert good, name


@given(st.integers(min_value=-10, max_value=10))
@FAST
def test_replicas_between_one_and_five(replicas: int) -> None:
    try:
        assert spec.desired_config(EVENT_STORE | {"replicas": replicas})["num_replicas"] == replicas
    except spec.DeclarationError as error:
        assert not 1 <= replicas <= 5 and "replicas" in str(error)
    else:
        assert 1 <= replicas <= 5


@given(st.integers(min_value=100, max_value=10**7), st.integers(min_value=100, max_value=10**7))
@example(60_000, 120_000)
@example(120_000, 120_000)
@FAST
def test_a_duplicate_window_longer_than_max_age_is_refused(max_age_ms: int, window_ms: int) -> None:
    declared = EVENT_STORE | {
        "deletes_old_events": True,
        "max_age": f"{max_age_ms}ms",
        "duplicate_window": f"{window_ms}ms",
    }
    try:
        spec.desired_config(declared)
    except spec.DeclarationError as error:
        assert window_ms > max_age_ms, error
        assert "stream EVENTS: duplicate_window" in str(error) and not re.search(r"[0-9]{7}", str(error))
    else:
        assert window_ms <= max_age_ms


# Destructive and impossible changes -----------------------------------------------------------


def change(current: dict[str, Any], declared: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    diff: dict[str, tuple[Any, Any]] = spec.changes(
        SERVER_CONFIG | current, spec.desired_config(EVENT_STORE | declared)
    )
    return diff


DESTRUCTIVE: list[tuple[dict[str, Any], dict[str, Any], str]] = [
    ({"num_replicas": 3}, {"replicas": 1}, "stream EVENTS: replicas 3 -> 1 (fewer copies)"),
    ({"subjects": ["events.>", "old.>"]}, {}, "subjects removed ['old.>']"),
    ({"retention": "limits"}, {"retention": "interest", "deletes_old_events": True}, "retention limits -> interest"),
    ({}, {"max_age": "30d", "deletes_old_events": True}, "max_age lowered none -> 30d (older events are deleted)"),
    ({"max_age": 60 * 86400 * SECOND}, {"max_age": "30d", "deletes_old_events": True}, "max_age lowered 60d -> 30d"),
    ({"max_bytes": 20 * GB}, {"max_bytes": "10GB"}, "max_bytes lowered 20GB -> 10GB ("),
    ({}, {"max_bytes": "10GB"}, "max_bytes lowered unlimited -> 10GB"),
    ({"max_msgs": 100}, {"max_msgs": 10}, "max_msgs lowered 100 -> 10"),
    ({}, {"max_msgs_per_subject": 5, "deletes_old_events": True}, "max_msgs_per_subject lowered unlimited -> 5"),
    ({"max_msg_size": 1 << 20}, {"max_msg_size": "1KB"}, "max_msg_size lowered 1MB -> 1KB (larger events are refused)"),
    ({}, {"max_consumers": 100}, "max_consumers lowered unlimited -> 100 (consumers beyond it are refused"),
    ({}, {"consumer_inactive_threshold": "1h"}, "consumer_inactive_threshold lowered none -> 1h"),
    ({"allow_direct": True}, {"allow_direct": False}, "allow_direct true -> false (direct gets are refused)"),
    ({"allow_atomic": True}, {"allow_atomic": False}, "allow_atomic true -> false (atomic batch appends are refused)"),
    ({"discard": "new"}, {"discard": "old", "max_bytes": "10GB", "deletes_old_events": True}, "discard new -> old"),
    ({}, {"allow_rollup": True, "deny_purge": False, "deletes_old_events": True}, "allow_rollup false -> true"),
]


@pytest.mark.parametrize(("current", "declared", "words"), DESTRUCTIVE, ids=[w for _, _, w in DESTRUCTIVE])
def test_destructive_changes(current: dict[str, Any], declared: dict[str, Any], words: str) -> None:
    found = spec.destructive("EVENTS", change(current, declared), None, spec.flatten(SERVER_CONFIG | current))
    assert any(words in f for f in found), found


def test_discard_old_meets_the_limit_the_stream_already_has() -> None:
    """discard new -> old on a stream whose max_bytes stays: the diff holds only the discard."""
    current = SERVER_CONFIG | {"max_bytes": 10 * GB}
    diff = spec.changes(current, spec.desired_config(SIZED | {"discard": "old", "deletes_old_events": True}))
    assert diff == {"discard": ("new", "old")}
    assert spec.destructive("EVENTS", diff, None, spec.flatten(current)) == [
        "stream EVENTS: discard new -> old (the oldest events are deleted when the stream is full)"
    ]
    assert spec.destructive("EVENTS", diff, None, spec.flatten(SERVER_CONFIG)) == []


NOT_DESTRUCTIVE: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"max_bytes": 10 * GB}, {"max_bytes": "20GB"}),
    ({"max_bytes": 10 * GB}, {"max_bytes": -1}),
    ({"max_age": 30 * 86400 * SECOND, "deny_delete": False, "discard": "old"}, {}),  # the migration: keeps more
    ({"num_replicas": 1}, {"replicas": 3}),
    ({}, {"subjects": ["events.>", "more.>"]}),
    ({}, {"allow_direct": True, "allow_atomic": True, "description": "the store"}),
    ({"consumer_limits": {"inactive_threshold": 3600 * SECOND}}, {}),
    ({"duplicate_window": 120 * SECOND}, {"duplicate_window": "1m"}),
]


@pytest.mark.parametrize(("current", "declared"), NOT_DESTRUCTIVE)
def test_changes_that_keep_more_are_not_destructive(current: dict[str, Any], declared: dict[str, Any]) -> None:
    diff = change(current, declared)
    assert diff, "the case changes nothing"
    assert spec.destructive("EVENTS", diff) == []


LIMIT = st.one_of(st.just(-1), st.just(0), st.integers(min_value=1, max_value=1 << 40))


@given(LIMIT, LIMIT)
@FAST
def test_a_limit_is_destructive_exactly_when_it_tightens(before: int, after: int) -> None:
    current = SERVER_CONFIG | {"max_msgs": before}
    found = spec.destructive("EVENTS", spec.changes(current, spec.desired_config(EVENT_STORE | {"max_msgs": after})))
    tightens = after > 0 and (before <= 0 or after < before)
    assert bool(found) is tightens, (before, after, found)


def test_a_lowered_limit_says_what_the_stream_already_holds() -> None:
    diff = change({"max_bytes": 20 * GB}, {"max_bytes": "1GB"})
    (found,) = spec.destructive("EVENTS", diff, {"bytes": 3 * GB, "messages": 10})
    assert "max_bytes lowered 20GB -> 1GB, below the 3GB it holds" in found
    (found,) = spec.destructive("EVENTS", change({"max_msgs": 100}, {"max_msgs": 5}), {"messages": 50})
    assert "below the 50 messages it holds" in found


IMPOSSIBLE: list[tuple[dict[str, Any], dict[str, Any], str]] = [
    ({"storage": "memory"}, {}, "storage memory -> file: NATS cannot change it in place"),
    ({}, {"retention": "workqueue", "deletes_old_events": True}, "retention limits -> workqueue: the server cannot"),
    (
        {},
        {"deny_delete": False, "deletes_old_events": True},
        "deny_delete true -> false: the server never turns it off",
    ),
    ({}, {"deny_purge": False, "deletes_old_events": True}, "deny_purge true -> false"),
    ({"sealed": True}, {"max_bytes": "20GB"}, "stream EVENTS is sealed"),
    (
        {"duplicate_window": 120 * SECOND},
        {"max_age": "1m", "deletes_old_events": True},
        "its duplicate_window 2m would be longer than max_age 1m",
    ),
]


@pytest.mark.parametrize(("current", "declared", "words"), IMPOSSIBLE, ids=[w for _, _, w in IMPOSSIBLE])
def test_changes_the_server_cannot_make(current: dict[str, Any], declared: dict[str, Any], words: str) -> None:
    found = spec.impossible("EVENTS", change(current, declared), SERVER_CONFIG | current)
    assert any(words in f for f in found), found


def test_a_possible_change_is_not_called_impossible() -> None:
    diff = change({"deny_delete": False, "discard": "old"}, {"max_bytes": "20GB"})
    assert diff and spec.impossible("EVENTS", diff, SERVER_CONFIG | {"deny_delete": False}) == []


# Declared consumers ------------------------------------------------------------------------------

# A consumer as CONSUMER.INFO returns it after being created from {"name": "c", "ack_wait": 0, ...}.
SERVER_CONSUMER = {
    "name": "c",
    "durable_name": "c",
    "deliver_policy": "all",
    "ack_policy": "explicit",
    "ack_wait": 30 * SECOND,
    "max_deliver": -1,
    "max_waiting": 512,
    "max_ack_pending": 1000,
    "replay_policy": "instant",
    "num_replicas": 0,
}


def test_consumer_zero_values_are_what_the_server_makes_of_them() -> None:
    declared = EVENT_STORE | {
        "consumers": [
            {"name": "c", "ack_wait": 0, "max_ack_pending": 0, "max_deliver": 0, "inactive_threshold": 0},
            {"name": "d", "description": "", "filter_subject": "events.x", "max_deliver": -1},
        ]
    }
    first, second = spec.declared_consumers(declared, spec.desired_config(declared))
    assert spec.consumer_changes(SERVER_CONSUMER, first) == {}
    assert spec.consumer_changes(SERVER_CONSUMER | {"name": "d", "filter_subject": "events.x"}, second) == {}
    assert first["ack_policy"] == "explicit", "a declared durable acknowledges unless declared otherwise"


def test_consumer_settings_the_server_cannot_change() -> None:
    declared = EVENT_STORE | {"consumers": [{"name": "c", "ack_policy": "none", "deliver_policy": "new"}]}
    (wanted,) = spec.declared_consumers(declared, spec.desired_config(declared))
    diff = spec.consumer_changes(SERVER_CONSUMER, wanted)
    refused = spec.consumer_refusals("stream EVENTS: consumer c", diff)
    assert refused == [
        "stream EVENTS: consumer c: ack_policy explicit -> none: the server cannot change it on an existing consumer "
        "(declare a consumer with another name)",
        "stream EVENTS: consumer c: deliver_policy all -> new: the server cannot change it on an existing consumer "
        "(declare a consumer with another name)",
    ]
    bigger = EVENT_STORE | {"consumers": [{"name": "c", "max_ack_pending": 5000}]}
    (wanted,) = spec.declared_consumers(bigger, spec.desired_config(bigger))
    assert spec.consumer_refusals("c", spec.consumer_changes(SERVER_CONSUMER, wanted)) == []


# The declarations as a whole, and the JetStream limits --------------------------------------------


def test_declaration_problems() -> None:
    overlapping = EVENT_STORE | {"name": "ORDERS", "subjects": ["events.orders.*"]}
    found = spec.declaration_problems([EVENT_STORE, overlapping, EVENT_STORE | {"replicas": 5}], 3)
    assert any("overlap in subjects (events.orders.* / events.>)" in p for p in found), found
    assert any("declared twice" in p for p in found), found
    assert spec.declaration_problems({"name": "x"}, 3) == [
        "jetstream_streams_declared: must be a list of streams, got a mapping {'name': 'x'}"
    ]
    assert spec.declaration_problems("INFRA", 3)[0].endswith("got a string 'INFRA'")
    assert spec.declaration_problems([EVENT_STORE | {"replicas": 5, "name": "BIG", "subjects": ["big.>"]}], 3) == [
        "jetstream_streams_declared: stream BIG: replicas 5 is more than the 3 cluster members"
    ]
    assert spec.declaration_problems([EVENT_STORE | {"replicas": 0}], 3)[0].endswith("must be 1 to 5, got 0")
    disjoint = EVENT_STORE | {"name": "AUDIT", "subjects": ["audit.*", "events"]}
    assert spec.declaration_problems([EVENT_STORE, disjoint], 3) == []


def test_the_inventory_s_own_stream_fits_its_limits() -> None:
    assert problems([SIZED | {"consumers": [{"name": "projector"}]}]) == []


LIMIT_CASES: list[tuple[list[dict[str, Any]], dict[str, Any] | None, list[dict[str, Any]], list[str]]] = [
    (
        [SIZED | {"max_bytes": "20GB"}],
        ACCOUNT,
        NODES,
        [
            "stream EVENTS: max_bytes 20GB x 3 replicas is more than nats_server_app_jetstream_limits.max_file 48GB",
            "stream EVENTS: max_bytes 20GB is more than nats_server_jetstream_max_file_store of nats-1, nats-2, nats-3",
        ],
    ),
    (
        [SIZED, SIZED | {"name": "AUDIT", "subjects": ["audit.>"]}],
        ACCOUNT,
        NODES,
        [
            "the declared file streams reserve 60GB (max_bytes x replicas), more than "
            "nats_server_app_jetstream_limits.max_file 48GB",
            "the declared file streams with a replica on every node reserve 20GB on each, more than "
            "nats_server_jetstream_max_file_store 16GB",
        ],
    ),
    ([EVENT_STORE], ACCOUNT, NODES, ["stream EVENTS: no max_bytes: a stream without one reserves nothing"]),
    ([SIZED | {"max_bytes": -1}], ACCOUNT, NODES, ["stream EVENTS: no max_bytes"]),
    (
        [SIZED | {"storage": "memory", "max_bytes": "2GB"}],
        ACCOUNT,
        NODES,
        [
            "stream EVENTS: max_bytes 2GB x 3 replicas is more than nats_server_app_jetstream_limits.max_memory 3GB",
            "stream EVENTS: max_bytes 2GB is more than nats_server_jetstream_max_memory_store of nats-1, nats-2",
        ],
    ),
    (
        [SIZED],
        ACCOUNT,
        [*NODES[:2], NODES[2] | {"nats_server_jetstream_max_file_store": "8GB"}],
        ["stream EVENTS: max_bytes 10GB is more than nats_server_jetstream_max_file_store of nats-3: its 3 replicas"],
    ),
    (
        # 16G is 16 * 10^9 bytes to nats-server: less than 15GiB + a bit.
        [SIZED | {"max_bytes": "15500MB"}],
        ACCOUNT,
        [n | {"nats_server_jetstream_max_file_store": "16G"} for n in NODES],
        ["max_bytes 15500MB is more than nats_server_jetstream_max_file_store of nats-1, nats-2, nats-3"],
    ),
    (
        [SIZED | {"name": f"S{n}", "subjects": [f"s{n}.>"], "max_bytes": "1GB"} for n in range(3)],
        ACCOUNT | {"max_streams": 2},
        NODES,
        ["3 streams declared, more than nats_server_app_jetstream_limits.max_streams 2"],
    ),
    (
        [SIZED | {"consumers": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}],
        ACCOUNT | {"max_consumers": 2},
        NODES,
        ["stream EVENTS: 3 consumers declared, more than nats_server_app_jetstream_limits.max_consumers 2"],
    ),
    (
        [SIZED | {"max_consumers": 2, "consumers": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}],
        ACCOUNT,
        NODES,
        ["stream EVENTS: 3 consumers declared, more than its max_consumers 2"],
    ),
    (
        [SIZED | {"max_consumers": 5000}],
        ACCOUNT,
        NODES,
        ["stream EVENTS: max_consumers 5000 is more than nats_server_app_jetstream_limits.max_consumers 4096"],
    ),
    ([SIZED], None, NODES, ["nats_server_app_jetstream_limits is not known here"]),
    # Five replicas on three nodes: said once, as the cluster's size, not again as the stores'.
    ([SIZED | {"replicas": 5, "max_bytes": "1GB"}], ACCOUNT, NODES, ["replicas 5 is more than the 3 cluster members"]),
]


@pytest.mark.parametrize(("streams", "account", "nodes", "expected"), LIMIT_CASES, ids=[c[3][0] for c in LIMIT_CASES])
def test_the_declared_streams_against_the_jetstream_limits(
    streams: list[dict[str, Any]], account: Any, nodes: list[dict[str, Any]], expected: list[str]
) -> None:
    found = problems(streams, account, nodes)
    for words in expected:
        assert any(words in p for p in found), (words, found)
    assert len(found) == len(expected), found
    assert all(p.startswith("jetstream_streams_declared: ") and len(p) < 320 for p in found), found


@given(
    st.integers(min_value=1, max_value=64).map(lambda n: n * GB // 4),
    st.integers(min_value=1, max_value=5),
    st.integers(min_value=1, max_value=200).map(lambda n: n * GB // 2),
)
@FAST
def test_a_stream_fits_the_account_exactly_when_max_bytes_times_replicas_does(
    max_bytes: int, replicas: int, max_file: int
) -> None:
    nodes = [n | {"host": f"nats-{i}", "nats_server_jetstream_max_file_store": "1TB"} for i, n in enumerate(NODES * 2)]
    declared = SIZED | {"max_bytes": max_bytes, "replicas": replicas}
    found = spec.declaration_problems([declared], 6, ACCOUNT | {"max_file": f"{max_file}"}, nodes[:5])
    assert bool(found) is (max_bytes * replicas > max_file), found


def test_the_account_s_own_figures_checked_before_a_change() -> None:
    """The module's check against $JS.API.INFO `limits` and the account's streams (STREAM.LIST)."""
    limits = {"max_storage": 48 * GB, "max_memory": 3 * GB, "max_streams": 3}
    other = {"name": "OTHER", "storage": "file", "num_replicas": 3, "max_bytes": 5 * GB}
    events = spec.desired_config(SIZED)
    assert spec.account_problems(limits, [other], [events]) == []
    bigger = spec.desired_config(SIZED | {"max_bytes": "20GB"})
    assert spec.account_problems(limits, [other, events], [bigger]) == [
        "streams EVENTS: the account's file streams would reserve 75GB (max_bytes x replicas), more than its "
        "max_storage 48GB (nats_server_app_jetstream_limits.max_file); the server would refuse them"
    ]
    # Already over through streams nobody declared: not this declaration's doing.
    crowded = [other | {"max_bytes": 40 * GB}]
    assert spec.account_problems(limits, [*crowded, events], [events]) == []
    many = [other | {"name": f"O{n}"} for n in range(3)]
    assert spec.account_problems(limits, many, [events])[0].startswith(
        "streams EVENTS: the account would hold 4 streams, more than its max_streams 3"
    )
