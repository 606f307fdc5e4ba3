"""site.yml and streams.yml refuse bad stream declarations and bad streams variables in
preflight, naming the stream (or the variable), and touch no host (run offline: tests/offline.py).
The limits cases check the declaration against the inventory's own JetStream limits: the account's
(nats_server_app_jetstream_limits: max_file 48GB) and each node's (max_file_store 16GB)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.offline import assert_one_short_refusal, make_inventory, run_offline_playbook

NEW_EVENT_STORE = {
    "name": "INFRASTRUCTURE_EVENTS",
    "subjects": ["infrastructure.>"],
    "storage": "file",
    "replicas": 3,
    "max_bytes": "10GB",
}
OLD_EVENT_STORE = NEW_EVENT_STORE | {"retention": "limits", "max_age": "30d", "max_bytes": "10GB"}
AUDIT = NEW_EVENT_STORE | {"name": "AUDIT", "subjects": ["audit.>"]}
LIMITS = {"max_memory": "3GB", "max_file": "48GB", "max_streams": 64, "max_consumers": 4096}


def declared(streams: Any) -> dict[str, Any]:
    return {"group_vars": {"jetstream_streams_declared": streams}}


CASES: dict[str, tuple[dict[str, Any], str]] = {
    # Today's production declaration: events deleted after 30 days.
    "stream deletes by age": (declared([OLD_EVENT_STORE]), "would delete events (max_age"),
    "stream deletes the oldest when full": (
        declared([NEW_EVENT_STORE | {"discard": "old"}]),
        "with discard old deletes",
    ),
    "stream replicas above the cluster": (
        declared([NEW_EVENT_STORE | {"replicas": 5, "max_bytes": "1GB"}]),
        "replicas 5 is more than",
    ),
    "streams share subjects": (
        declared([NEW_EVENT_STORE, AUDIT | {"name": "COMPUTE", "subjects": ["infrastructure.compute.>"]}]),
        "overlap in subjects",
    ),
    "allow_destructive not a boolean": (
        {"group_vars": {"jetstream_streams_allow_destructive": "nope"}},
        "Streams variables rejected before any host was touched: jetstream_streams_allow_destructive: "
        "The value 'nope' is not a valid boolean. Use true or false.",
    ),
    "purge_delete not a boolean": (
        {"group_vars": {"jetstream_streams_purge_delete": "sometimes"}},
        "jetstream_streams_purge_delete: The value 'sometimes' is not a valid boolean",
    ),
    "declaration not a list": (
        declared(NEW_EVENT_STORE),
        "jetstream_streams_declared: must be a list of streams, got a mapping",
    ),
    "stream name with a dot": (
        declared([NEW_EVENT_STORE | {"name": "infrastructure.events"}]),
        "stream name 'infrastructure.events' must be 1-255 letters, digits, '-' or '_'",
    ),
    "replicas not a number": (
        declared([NEW_EVENT_STORE | {"replicas": "three"}]),
        "stream INFRASTRUCTURE_EVENTS: replicas: not a whole number: 'three'",
    ),
    "duplicate window longer than max age": (
        declared([NEW_EVENT_STORE | {"max_age": "1m", "duplicate_window": "5m", "deletes_old_events": True}]),
        "stream INFRASTRUCTURE_EVENTS: duplicate_window 5m is longer than max_age 1m: the server refuses it",
    ),
    "consumer name with a dot": (
        declared([NEW_EVENT_STORE | {"consumers": [{"name": "read.model"}]}]),
        "stream INFRASTRUCTURE_EVENTS: consumer name 'read.model' must be",
    ),
    "consumer ack_wait in words": (
        declared([NEW_EVENT_STORE | {"consumers": [{"name": "projector", "ack_wait": "5 minutes"}]}]),
        "stream INFRASTRUCTURE_EVENTS: consumer projector: ack_wait: not a duration: '5 minutes'",
    ),
    "stream without max_bytes": (
        declared([NEW_EVENT_STORE | {"max_bytes": -1}]),
        "stream INFRASTRUCTURE_EVENTS: no max_bytes: a stream without one reserves nothing",
    ),
    "max_bytes x replicas above the account": (
        declared([NEW_EVENT_STORE | {"max_bytes": "20GB"}]),
        "stream INFRASTRUCTURE_EVENTS: max_bytes 20GB x 3 replicas is more than "
        "nats_server_app_jetstream_limits.max_file 48GB",
    ),
    "max_bytes above one node's store": (
        declared([NEW_EVENT_STORE]) | {"host_vars": {"nats-3": {"nats_server_jetstream_max_file_store": "8GB"}}},
        "stream INFRASTRUCTURE_EVENTS: max_bytes 10GB is more than nats_server_jetstream_max_file_store of nats-3",
    ),
    "streams together above the limits": (
        declared([NEW_EVENT_STORE, AUDIT]),
        "the declared file streams reserve 60GB (max_bytes x replicas), more than "
        "nats_server_app_jetstream_limits.max_file 48GB",
    ),
    "more streams than the account takes": (
        {
            "group_vars": {
                "nats_server_app_jetstream_limits": LIMITS | {"max_streams": 1},
                "jetstream_streams_declared": [NEW_EVENT_STORE | {"max_bytes": "1GB"}, AUDIT | {"max_bytes": "1GB"}],
            }
        },
        "2 streams declared, more than nats_server_app_jetstream_limits.max_streams 1",
    ),
    "more consumers than the account takes": (
        {
            "group_vars": {
                "nats_server_app_jetstream_limits": LIMITS | {"max_consumers": 1},
                "jetstream_streams_declared": [NEW_EVENT_STORE | {"consumers": [{"name": "a"}, {"name": "b"}]}],
            }
        },
        "stream INFRASTRUCTURE_EVENTS: 2 consumers declared, more than "
        "nats_server_app_jetstream_limits.max_consumers 1",
    ),
}


@pytest.mark.parametrize("playbook", ["site.yml", "streams.yml"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_declaration_is_refused_before_touching_hosts(playbook: str, case: str, tmp_path: Path) -> None:
    change, expected = CASES[case]
    run = run_offline_playbook(playbook, make_inventory(tmp_path, change), tmp_path=tmp_path)
    assert run.result.returncode != 0, run.output
    assert expected in run.output, run.output
    assert "Deploy |" not in run.output, "a deploy play started after a failed preflight"
    assert "Streams | apply the declaration" not in run.output, "the streams were applied after a failed preflight"
    assert run.ssh_calls == [], "preflight connected to a host"
    assert_one_short_refusal(run.output)


def test_the_inventory_s_own_declaration_passes_the_streams_preflight(tmp_path: Path) -> None:
    """The lab's (phx's) INFRASTRUCTURE_EVENTS fits the limits: streams.yml gets past its preflight
    to the module on the controller, which then reaches no cluster (the empty network)."""
    run = run_offline_playbook("streams.yml", make_inventory(tmp_path, {}), tmp_path=tmp_path)
    assert "rejected before any host was touched" not in run.output, run.output[-3000:]
    assert "TASK [jetstream_streams : Streams | apply the declared streams and consumers]" in run.output, run.output[
        -3000:
    ]
    assert "fatal: [nats-1 -> localhost]" in run.output, run.output[-3000:]
    assert run.ssh_calls == []
