"""Hypothesis strategies for valid cluster inventories, and their plain-jinja2 rendering."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

import jinja2
from hypothesis import strategies as st

from tests.helpers import NATS_SERVER_VERSION, OFFLINE_PASSWORDS, OFFLINE_PKI, REPO, load_filter_plugin

_secrets = load_filter_plugin("nats_secrets")
# Computed once: bcrypt is slow on purpose, and the template only needs the hashes.
PASSWORD_HASHES = {
    f"_{name}_hash": _secrets.nats_bcrypt(password, f"offline/{name}") for name, password in OFFLINE_PASSWORDS.items()
}
# One application like the CIM, its user as the role renders it.
CLIENT_USERS = _secrets.nats_app_client_users(
    [{"name": "app", "password": OFFLINE_PASSWORDS["nats_server_client_cim_password"], "streams": ["EVENTS"]}],
    "offline",
)
# Every generated node uses nats-1's files: nats-server -t loads them, nothing checks the names.
TLS_FILES = {
    "_nats_server_tls_ca": str(OFFLINE_PKI / "ca.crt"),
    "_nats_server_tls_cert": str(OFFLINE_PKI / "nats-1.crt"),
    "_nats_server_tls_key": str(OFFLINE_PKI / "nats-1.key"),
}

NAME_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,20}\Z")
sizes = st.builds(lambda n, unit: f"{n}{unit}", st.integers(1, 4096), st.sampled_from(["MB", "GB", "M", "G", "KB"]))
ports = st.integers(1024, 65535)


@dataclass
class Cluster:
    """One generated cluster: per-host settings as the inventory would give them."""

    hosts: dict[str, dict[str, Any]]
    group: str = "nats_cluster"
    common: dict[str, Any] = field(default_factory=dict)

    def context(self, host: str) -> dict[str, Any]:
        """The variables the role gives the template for `host`."""
        hostvars = {h: self.common | v for h, v in self.hosts.items()}
        return hostvars[host] | {
            "inventory_hostname": host,
            "groups": {self.group: list(self.hosts)},
            "hostvars": hostvars,
            "nats_server_cluster_group": self.group,
            "_nats_server_pid_file": "/run/nats-server/nats-server.pid",
            "_nats_server_app_client_users": CLIENT_USERS,
            **PASSWORD_HASHES,
            **TLS_FILES,
        }

    def preflight_settings(self, host: str) -> dict[str, Any]:
        """What the preflight task collects for `host` (see roles/nats_server/tasks/preflight.yml)."""
        ctx = self.context(host)
        keys = [k for k in ctx if k.startswith(("nats_server_", "jetstream_storage_")) and k not in OFFLINE_PASSWORDS]
        secrets = {name: _secrets.nats_secret_summary(ctx.get(name)) for name in OFFLINE_PASSWORDS}
        # The preflight sees the applications with their passwords summarised.
        ctx = ctx | {"nats_server_app_clients": _secrets.nats_app_client_summaries(ctx["nats_server_app_clients"])}
        return {"host": host, "secrets": secrets} | {k: ctx[k] for k in keys}


@st.composite
def clusters(draw: st.DrawFn) -> Cluster:
    size = draw(st.sampled_from([3, 5, 7]))
    host_names = draw(st.lists(names, min_size=size, max_size=size, unique_by=str.lower))
    base = draw(st.integers(0x0A000000, 0x0AFFFF00))
    addresses = [str(ipaddress.IPv4Address(base + i + 1)) for i in range(size)]
    client, cluster_port, monitor = draw(st.lists(ports, min_size=3, max_size=3, unique=True))
    mount = "/mnt/" + draw(st.from_regex(r"\A[a-z][a-z0-9-]{0,15}\Z"))
    backend = draw(st.sampled_from(["nfs", "local"]))
    # On local disk every host may use the same path (each its own disk); on the share never.
    same_dir_everywhere = backend == "local" and draw(st.booleans())
    common = {
        "nats_server_cluster_name": draw(names),
        "nats_server_jetstream_domain": draw(names),
        "nats_server_version": NATS_SERVER_VERSION,
        "nats_server_artifact_source": "url",
        "nats_server_release_base_url": "https://github.com/nats-io/nats-server/releases/download",
        "nats_server_controller_release_dir": "",
        "nats_server_client_port": client,
        "nats_server_cluster_port": cluster_port,
        "nats_server_cluster_pool_size": draw(st.sampled_from([-1, 1, 3])),
        "nats_server_monitor_port": monitor,
        "nats_server_jetstream_max_memory_store": draw(sizes),
        "nats_server_jetstream_max_file_store": draw(sizes),
        "nats_server_jetstream_sync_interval": draw(st.sampled_from(["", "always", "2m", "10s", "1m30s", "500ms"])),
        "nats_server_lame_duck_duration_seconds": draw(st.integers(30, 300)),
        "nats_server_lame_duck_grace_period_seconds": draw(st.integers(0, 29)),
        "nats_server_user": "nats",
        "nats_server_limit_nofile": draw(st.integers(65536, 1048576)),
        "nats_server_health_retries": draw(st.integers(1, 600)),
        "nats_server_health_delay": draw(st.integers(1, 60)),
        "jetstream_storage_backend": backend,
        "jetstream_storage_mount_path": mount,
        "jetstream_storage_mount_source": "nfs.example:/export",
        "jetstream_storage_mount_options": "rw,hard,noatime",
        "jetstream_storage_marker_name": ".jetstream-owner",
        "jetstream_storage_owner": "nats",
        "nats_server_tls_ca_file": TLS_FILES["_nats_server_tls_ca"],
        "nats_server_tls_cert_file": TLS_FILES["_nats_server_tls_cert"],
        "nats_server_tls_key_file": TLS_FILES["_nats_server_tls_key"],
        "nats_server_tls_cert_content_set": False,
        "nats_server_tls_key_content_set": False,
        "nats_server_tls_timeout_seconds": draw(st.integers(1, 10)),
        "nats_server_app_account": "APP",
        "nats_server_app_admin_user": draw(names.filter(lambda name: name != "sys")),
        "nats_server_app_clients": [],
        "nats_server_app_jetstream_limits": {
            "max_memory": draw(sizes),
            "max_file": draw(sizes),
            "max_streams": draw(st.integers(1, 1000)),
            "max_consumers": draw(st.integers(1, 10000)),
        },
        "nats_server_system_account": "SYS",
        "nats_server_system_user": "sys",
        "nats_server_route_user": "route",
        **OFFLINE_PASSWORDS,
    }
    hosts = {}
    for name, address in zip(host_names, addresses, strict=True):
        node_dir = f"{mount}/{'jetstream' if same_dir_everywhere else name}"
        hosts[name] = {
            "nats_server_name": name,
            "nats_server_address": address,
            "nats_server_client_host": address,
            "nats_server_cluster_host": address,
            "nats_server_monitor_host": address,
            "jetstream_storage_node_dir": node_dir,
            "nats_server_jetstream_store_dir": node_dir,
            "nats_server_jetstream_store_marker": f"{node_dir}/.jetstream-owner",
        }
    return Cluster(hosts=hosts, common=common)


def render_config(context: dict[str, Any]) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(REPO / "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    return env.get_template("nats-server.conf.j2").render(context)


# host:port of each route URL (the route user and password before '@' left out).
ROUTE_RE = re.compile(r'"nats-route://(?:[^@"/]+@)?([^"]+)"')


def routes_of(config_text: str) -> set[str]:
    return set(ROUTE_RE.findall(config_text))
