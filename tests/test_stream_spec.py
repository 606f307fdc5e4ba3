"""The declared-stream reading shared by the module, the preflight and verify: sizes, durations,
the keep-every-event defaults and the declaration-wide problems (pure logic, no server)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import load_module_util

spec = load_module_util("jetstream_stream_spec")
EVENT_STORE: dict[str, Any] = {"name": "EVENTS", "subjects": ["events.>"], "storage": "file", "replicas": 3}


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("1m", 60), ("1m30s", 90), ("2h", 7200), ("1d", 86400), ("500ms", 0.5), (90, 90)]
)
def test_durations(text: Any, seconds: float) -> None:
    assert spec.parse_duration(text) == int(seconds * spec.NANOS)


@pytest.mark.parametrize("text", ["-5s", "5", "1x", "", "1m-30s", "9999999999999d", -1])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(ValueError):
        spec.parse_duration(text)


@pytest.mark.parametrize("text", ["99999999999T", "-2", "10 gigs", "-1GB"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        spec.parse_size(text)


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
        ({"max_msgs_per_subject": 1, "discard": "old"}, "max_msgs_per_subject with discard old"),
        ({"retention": "workqueue"}, "retention workqueue"),
        ({"allow_rollup": True}, "allow_rollup"),
        ({"deny_delete": False}, "deny_delete false"),
    ],
)
def test_a_deleting_declaration_needs_the_explicit_key(extra: dict[str, Any], words: str) -> None:
    with pytest.raises(spec.DeclarationError, match=words):
        spec.desired_config(EVENT_STORE | extra)
    assert spec.desired_config(EVENT_STORE | extra | {"deletes_old_events": True})["name"] == "EVENTS"


def test_a_server_default_equals_its_declared_spelling() -> None:
    """The server leaves out or zeroes what is unlimited: no change is reported for it."""
    server = {"name": "EVENTS", "subjects": ["events.>"], "storage": "file", "num_replicas": 3, "max_bytes": -1}
    server |= {"discard": "new", "deny_delete": True, "deny_purge": True, "max_age": 0, "consumer_limits": {}}
    assert spec.changes(server, spec.desired_config(EVENT_STORE | {"max_bytes": 0})) == {}


def test_declaration_problems() -> None:
    overlapping = EVENT_STORE | {"name": "ORDERS", "subjects": ["events.orders.*"]}
    problems = spec.declaration_problems([EVENT_STORE, overlapping, EVENT_STORE | {"replicas": 5}], 3)
    assert any("overlap in subjects (events.orders.* / events.>)" in p for p in problems), problems
    assert any("declared twice" in p for p in problems), problems
    assert spec.declaration_problems({"name": "x"}, 3) == [
        "jetstream_streams_declared: must be a list of streams, got dict"
    ]
    assert spec.declaration_problems([EVENT_STORE | {"replicas": 5, "name": "BIG", "subjects": ["big.>"]}], 3) == [
        "jetstream_streams_declared: stream BIG: replicas 5 is more than the 3 cluster members"
    ]
    assert spec.declaration_problems([EVENT_STORE | {"replicas": 0}], 3)[0].endswith("must be at least 1, got 0")
    disjoint = EVENT_STORE | {"name": "AUDIT", "subjects": ["audit.*", "events"]}
    assert spec.declaration_problems([EVENT_STORE, disjoint], 3) == []
