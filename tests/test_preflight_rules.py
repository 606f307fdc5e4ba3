"""The inventory rules preflight enforces (plugins/filter/nats_preflight.py), as plain Python."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def _store_dir(path_of: Callable[[str, str], str]) -> Mutation:
    """Gives the first host the store directory path_of(mount, host) in all three variables."""

    def mutate(cluster: Cluster) -> None:
        host = _first(cluster)
        path = path_of(cluster.common["jetstream_storage_mount_path"], host)
        cluster.hosts[host] |= {
            "jetstream_storage_node_dir": path,
            "nats_server_jetstream_store_dir": path,
            "nats_server_jetstream_store_marker": f"{path}/.jetstream-owner",
        }

    return mutate


def _mount_everywhere(mount: str) -> Mutation:
    """Moves every host's store under `mount` (the parent the storage role creates or mounts)."""

    def mutate(cluster: Cluster) -> None:
        cluster.common["jetstream_storage_mount_path"] = mount
        for host, values in cluster.hosts.items():
            path = f"{mount.rstrip('/')}/{host}"
            values |= {
                "jetstream_storage_node_dir": path,
                "nats_server_jetstream_store_dir": path,
                "nats_server_jetstream_store_marker": f"{path}/.jetstream-owner",
            }

    return mutate


def _hosts_differing_in_case(cluster: Cluster) -> None:
    first, second = list(cluster.hosts)[:2]
    cluster.hosts = {
        ("Xa" + first if h == first else "xA" + first if h == second else h): v for h, v in cluster.hosts.items()
    }


def _server_names_differing_in_case(cluster: Cluster) -> None:
    first, second = list(cluster.hosts)[:2]
    cluster.hosts[first]["nats_server_name"] = "Xa" + first
    cluster.hosts[second]["nats_server_name"] = "xA" + first


def _on_nfs(mutate: Mutation) -> Mutation:
    """The mutation on a cluster whose storage is the NFS share (its rules apply only there)."""

    def on_nfs(cluster: Cluster) -> None:
        cluster.common["jetstream_storage_backend"] = "nfs"
        mutate(cluster)

    return on_nfs


MUTATIONS: dict[str, tuple[Mutation, str]] = {
    "two hosts": (_keep_two_hosts, "has 2 host(s); a JetStream cluster needs at least 3"),
    "even count": (_add_host, "odd count"),
    "duplicate server name": (_copy_from_second("nats_server_name"), "nats_server_name"),
    "duplicate address": (_copy_from_second("nats_server_address"), "nats_server_address"),
    "shared store dir": (_on_nfs(_copy_from_second("nats_server_jetstream_store_dir")), "never share"),
    "store dir up a level": (_store_dir(lambda mount, _: f"{mount}/.."), "must be written plainly"),
    "store dir with an empty component": (_store_dir(lambda mount, host: f"{mount}//{host}"), "'..', '.', '//'"),
    "store dir with a dot": (_store_dir(lambda mount, host: f"{mount}/./{host}"), "must be written plainly"),
    "store dir with a trailing slash": (_store_dir(lambda mount, host: f"{mount}/{host}/"), "must be written plainly"),
    "store dir with a space": (_store_dir(lambda mount, host: f"{mount}/{host} 2"), "must not contain spaces"),
    "store dir with a tab": (_store_dir(lambda mount, host: f"{mount}/{host}\t"), "must not contain spaces"),
    "store dir relative": (_store_dir(lambda _, host: f"data/{host}"), "must be an absolute path"),
    "store dir inside another's": (_store_dir(lambda mount, host: f"{mount}/{host}/deeper"), "directly inside"),
    "mount on /var": (_mount_everywhere("/var"), "'/var' is a system directory"),
    "mount on /var/..": (_mount_everywhere("/var/.."), "it means '/'"),
    "mount on /": (_mount_everywhere("/"), "'/' is a system directory"),
    "mount on /etc": (_mount_everywhere("/etc"), "is a system directory"),
    "mount option with a space": (_on_nfs(_set("jetstream_storage_mount_options", "rw,hard, soft", True)), "no spaces"),
    "empty mount option": (_on_nfs(_set("jetstream_storage_mount_options", "rw,,hard", True)), "single commas"),
    "nfs source without export": (
        _on_nfs(_set("jetstream_storage_mount_source", "nfs.example", True)),
        "jetstream_storage_mount_source 'nfs.example' must be server:/export",
    ),
    "hosts differing in case": (_hosts_differing_in_case, "differ only in case"),
    "server names differing in case": (_server_names_differing_in_case, "is the server name of more than one host"),
    "sync interval in words": (
        _set("nats_server_jetstream_sync_interval", "2 minutes", True),
        "nats_server_jetstream_sync_interval '2 minutes' must be always",
    ),
    "sync interval of zero": (_set("nats_server_jetstream_sync_interval", "0s", True), "must be always, a duration"),
    "ipv6 address": (_set("nats_server_address", "fd00::1"), "is an IPv6 address"),
    "ipv6 listener": (_set("nats_server_monitor_host", "::"), "is an IPv6 address"),
    "password given as a number": (
        _set("nats_server_route_password", 123456789012345678, True),
        "nats_server_route_password is a number, not text",
    ),
    "negative stream limit": (
        lambda c: c.common["nats_server_app_jetstream_limits"].update(max_streams=-1),
        "max_streams -1 must be a positive whole number",
    ),
    "no consumers allowed": (
        lambda c: c.common["nats_server_app_jetstream_limits"].update(max_consumers="0"),
        "max_consumers '0' must be a positive whole number",
    ),
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
    "soft nfs mount": (_on_nfs(_set("jetstream_storage_mount_options", "rw,soft", True)), "'hard'"),
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


# Whole-number settings, with values outside the range preflight allows.
OUT_OF_RANGE = {
    "nats_server_limit_nofile": st.integers(max_value=65535) | st.integers(min_value=1048577) | st.just("lots"),
    "nats_server_health_retries": st.integers(max_value=0) | st.integers(min_value=601),
    "nats_server_health_delay": st.integers(max_value=0) | st.integers(min_value=61),
    "nats_server_cluster_pool_size": st.integers(max_value=-2) | st.integers(min_value=33),
    "nats_server_client_port": st.integers(max_value=0) | st.integers(min_value=65536),
    "nats_server_tls_timeout_seconds": st.integers(max_value=0) | st.integers(min_value=61),
}


@pytest.mark.parametrize("variable", sorted(OUT_OF_RANGE))
@settings(max_examples=15, deadline=None)
@given(cluster=clusters(), data=st.data())
def test_each_value_out_of_range_is_refused_naming_it(variable: str, cluster: Cluster, data: st.DataObject) -> None:
    value = data.draw(OUT_OF_RANGE[variable])
    cluster.hosts[_first(cluster)][variable] = value
    problems = problems_of(cluster)
    assert any(p.startswith(f"{_first(cluster)}: {variable}") for p in problems), problems


@settings(max_examples=50, deadline=None)
@given(cluster=clusters(), component=st.sampled_from(["..", ".", "", "a b", "a\nb", "~"]))
def test_a_store_dir_that_is_not_written_plainly_is_refused(cluster: Cluster, component: str) -> None:
    """`~` is a plain name to the kernel: accepted. The others are refused, naming the variable."""
    _store_dir(lambda mount, host: f"{mount}/{component}" if component != "" else f"{mount}//{host}")(cluster)
    problems = [p for p in problems_of(cluster) if "jetstream_storage_node_dir" in p]
    assert bool(problems) == (component != "~"), problems


def test_a_member_outside_the_play_is_tolerated() -> None:
    """Under --limit, members outside the play have no settings; the rest are still checked."""
    assert rules.cluster_problems([None, None, None], "nats_cluster", ["a", "b", "c"]) == []
