"""The inventory rules preflight enforces (plugins/filter/nats_preflight.py), as plain Python."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings

from tests.clusters import Cluster, clusters
from tests.helpers import load_filter_plugin

# The generated clusters name the offline certificates.
pytestmark = pytest.mark.usefixtures("offline_pki")


rules = load_filter_plugin("nats_preflight")


def problems_of(cluster: Cluster) -> list[str]:
    nodes = [cluster.preflight_settings(h) for h in cluster.hosts]
    return list(rules.cluster_problems(nodes, cluster.group, list(cluster.hosts)))


@settings(max_examples=200, deadline=None)
@given(cluster=clusters())
def test_every_valid_generated_cluster_passes(cluster: Cluster) -> None:
    assert problems_of(cluster) == []


def _first(cluster: Cluster) -> str:
    return next(iter(cluster.hosts))


Mutation = Callable[[Cluster], None]


def _set(variable: str, value: Any, everywhere: bool = False) -> Mutation:
    def mutate(cluster: Cluster) -> None:
        targets = list(cluster.hosts) if everywhere else [_first(cluster)]
        for host in targets:
            cluster.hosts[host][variable] = value

    return mutate


def _keep_two_hosts(cluster: Cluster) -> None:
    for host in list(cluster.hosts)[2:]:
        del cluster.hosts[host]


def _add_host(cluster: Cluster) -> None:
    """A well-formed extra member: the cluster is only wrong for its even size."""
    extra = "extra-member-x"
    node_dir = f"{cluster.common['jetstream_storage_mount_path']}/{extra}"
    cluster.hosts[extra] = {
        "nats_server_name": extra,
        "nats_server_address": "192.0.2.250",
        "nats_server_client_host": "192.0.2.250",
        "nats_server_cluster_host": "192.0.2.250",
        "nats_server_monitor_host": "192.0.2.250",
        "jetstream_storage_node_dir": node_dir,
        "nats_server_jetstream_store_dir": node_dir,
        "nats_server_jetstream_store_marker": f"{node_dir}/.jetstream-owner",
    }


def _copy_from_second(variable: str) -> Mutation:
    def mutate(cluster: Cluster) -> None:
        first, second = list(cluster.hosts)[:2]
        cluster.hosts[first][variable] = cluster.hosts[second][variable]

    return mutate


MUTATIONS: dict[str, tuple[Mutation, str]] = {
    "two hosts": (_keep_two_hosts, "has 2 host(s); a JetStream cluster needs at least 3"),
    "even count": (_add_host, "odd count"),
    "duplicate server name": (_copy_from_second("nats_server_name"), "nats_server_name"),
    "duplicate address": (_copy_from_second("nats_server_address"), "nats_server_address"),
    "shared store dir": (_copy_from_second("nats_server_jetstream_store_dir"), "never share"),
    "port out of range": (_set("nats_server_client_port", 70000), "nats_server_client_port 70000"),
    "port not a number": (_set("nats_server_monitor_port", "http"), "nats_server_monitor_port 'http'"),
    "colliding ports": (_set("nats_server_monitor_port", 0), "nats_server_monitor_port 0"),
    "bad octet": (_set("nats_server_address", "10.0.0.300"), "nats_server_address '10.0.0.300'"),
    "space in server name": (_set("nats_server_name", "nats 1"), "nats_server_name 'nats 1'"),
    "dot in domain": (_set("nats_server_jetstream_domain", "dgx.phx", True), "nats_server_jetstream_domain 'dgx.phx'"),
    "size that does not parse": (_set("nats_server_jetstream_max_file_store", "10 gigs"), "max_file_store '10 gigs'"),
    "store dir outside the mount": (
        _set("nats_server_jetstream_store_dir", "/var/lib/nats"),
        "nats_server_jetstream_store_dir '/var/lib/nats'",
    ),
    "soft nfs mount": (_set("jetstream_storage_mount_options", "rw,soft", True), "'hard'"),
    "no version": (_set("nats_server_version", "latest", True), "nats_server_version 'latest'"),
    "mixed cluster names": (_set("nats_server_cluster_name", "other"), "nats_server_cluster_name must be the same"),
    "short lame duck": (_set("nats_server_lame_duck_duration_seconds", 5, True), "at least 30"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
@settings(max_examples=10, deadline=None)
@given(cluster=clusters())
def test_each_broken_inventory_is_rejected_with_its_reason(name: str, cluster: Cluster) -> None:
    mutate, expected = MUTATIONS[name]
    mutate(cluster)
    problems = problems_of(cluster)
    assert any(expected in p for p in problems), problems


def test_a_member_outside_the_play_is_tolerated() -> None:
    """Under --limit, members outside the play have no settings; the rest are still checked."""
    assert rules.cluster_problems([None, None, None], "nats_cluster", ["a", "b", "c"]) == []
