"""The jetstream_peers module's decisions, on the answers nats-server 2.15.1 gives (their shape as
seen on the lab): which peers a replacement removes, and when a stream counts as whole again."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import load_plugin_module

peers_module = load_plugin_module("jetstream_peers")


def jsz(server: str, leader: str | None, replicas: dict[str, bool]) -> dict[str, Any]:
    """A $SYS.REQ.SERVER.PING.JSZ answer from `server`."""
    meta = {"leader": leader, "replicas": [{"name": n, "current": c} for n, c in replicas.items()]}
    return {"server": {"name": server}, "data": {"meta_cluster": meta}}


def test_the_leaders_answer_is_the_view_and_a_follower_alone_is_no_quorum() -> None:
    answers = [
        jsz("nats-1", "nats-2", {"nats-2": True, "nats-3": False}),
        jsz("nats-2", "nats-2", {"nats-1": True, "nats-3": False}),
    ]
    view = peers_module.meta_view(answers)
    assert view["leader"] == "nats-2"
    assert view["peers"] == {
        "nats-2": {"current": True, "offline": False},
        "nats-1": {"current": True, "offline": False},
        "nats-3": {"current": False, "offline": False},
    }
    with pytest.raises(peers_module.Refused, match="no meta leader answered"):
        peers_module.meta_view(answers[:1])
    with pytest.raises(peers_module.Refused, match="no quorum"):
        peers_module.meta_view([jsz("nats-1", None, {})])


PEERS = {
    "nats-1": {"current": True, "offline": False},
    "nats-2": {"current": True, "offline": False},
    "nats-3": {"current": False, "offline": False},
}


def test_the_lost_peers_are_those_not_in_the_inventory_and_a_member_is_never_removed() -> None:
    members = ["nats-1", "nats-2", "nats-3-2"]
    assert peers_module.to_remove(PEERS, members, []) == ["nats-3"]
    assert peers_module.to_remove(PEERS, ["nats-1", "nats-2", "nats-3"], []) == []
    # Named: only those, and only while the meta group still lists them.
    assert peers_module.to_remove(PEERS, members, ["nats-3", "nats-9"]) == ["nats-3"]
    with pytest.raises(peers_module.Refused, match="nats-2 in remove: a member"):
        peers_module.to_remove(PEERS, members, ["nats-2"])
    assert peers_module.running(PEERS, ["nats-3"]) == []
    assert peers_module.running(PEERS | {"nats-3": {"current": True, "offline": False}}, ["nats-3"]) == ["nats-3"]


def stream(replicas: int, leader: str | None, peers: dict[str, bool]) -> dict[str, Any]:
    cluster = {"leader": leader, "replicas": [{"name": n, "current": c} for n, c in peers.items()]}
    return {"config": {"name": "S", "num_replicas": replicas}, "cluster": cluster}


@pytest.mark.parametrize(
    ("info", "why"),
    [
        (stream(3, "nats-1", {"nats-2": True, "nats-3-2": True}), None),
        (stream(1, "nats-1", {}), None),
        (stream(3, "nats-1", {"nats-2": True}), "2 of 3 peers"),
        (stream(3, "nats-1", {"nats-2": True, "nats-3": False}), "3 of 3 peers; not a member: nats-3; behind: nats-3"),
        (stream(3, "nats-1", {"nats-2": True, "nats-3-2": False}), "3 of 3 peers; behind: nats-3-2"),
        (stream(3, None, {"nats-2": True, "nats-3-2": True}), "no leader"),
    ],
)
def test_a_replicated_stream_is_whole_with_all_its_peers_members_and_current(info: dict[str, Any], why: str) -> None:
    assert peers_module.stream_shortfall(info, ["nats-1", "nats-2", "nats-3-2"]) == why


def test_a_rescue_sees_the_leaders_the_survivors_still_name() -> None:
    assert peers_module.seen_leaders([jsz("nats-1", None, {"nats-2": False})]) == []
    assert peers_module.seen_leaders([jsz("nats-1", "nats-3", {}), jsz("nats-4", "nats-3", {})]) == ["nats-3"]
