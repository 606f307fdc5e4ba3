"""Preflight checks of a NATS cluster inventory, as an Ansible filter.

`nats_cluster_problems` takes one settings dict per cluster member (None for a member outside
the play, e.g. under --limit) and returns a list of problems, each naming the host and the
variable. An empty list means the inventory describes a cluster nats-server will accept.
Plain Python so the same rules are unit-tested directly (tests/test_preflight_rules.py).
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# NATS names (server, cluster, domain) are subject tokens: no spaces, dots or wildcards.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
# Sizes as nats-server.conf takes them unquoted: 512MB, 4GB, 1T ...
SIZE_RE = re.compile(r"^[1-9][0-9]*(K|M|G|T)B?$")
# nats-server reads sync_interval as a Go duration (time.ParseDuration) or "always".
SYNC_INTERVAL_RE = re.compile(r"^([1-9][0-9]*(ms|s|m|h))+$")
VERSION_RE = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+$")
URL_RE = re.compile(r"^https?://[^\s/]+(/\S*)?$")
LAME_DUCK_MINIMUM_SECONDS = 30
PORT_VARIABLES = ("nats_server_client_port", "nats_server_cluster_port", "nats_server_monitor_port")
ADDRESS_VARIABLES = (
    "nats_server_address",
    "nats_server_client_host",
    "nats_server_cluster_host",
    "nats_server_monitor_host",
)
# Secrets the inventory must give (from Ansible Vault); the preflight sees only their summaries.
PASSWORD_VARIABLES = ("nats_server_app_admin_password", "nats_server_system_password", "nats_server_route_password")
MINIMUM_PASSWORD_LENGTH = 16
BCRYPT_MAXIMUM_BYTES = 72
ACCOUNT_LIMIT_KEYS = {"max_memory", "max_file", "max_streams", "max_consumers"}
# Addresses a peer cannot dial; fine for listeners, not for the node's own address.
UNROUTABLE = {"0.0.0.0"}


def _address_problem(value: str) -> str | None:
    """Why `value` cannot be a node's address or listen host, or None."""
    if re.fullmatch(r"[0-9.]+", value):
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            return "is not a valid IP address or host name"
        return None
    if ":" in value:
        # Routes, certificates and verify's URLs are written for IPv4 and names (no [brackets]).
        return "is an IPv6 address: use an IPv4 address or a host name (IPv6 is not supported yet)"
    return None if HOSTNAME_RE.match(value) else "is not a valid IP address or host name"


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        return int(value)
    return None


def node_problems(node: Mapping[str, Any]) -> list[str]:
    """Problems with one node's settings, each prefixed by the host name."""
    host = str(node.get("host", "?"))
    problems: list[str] = []

    def bad(message: str) -> None:
        problems.append(f"{host}: {message}")

    for check in (
        _check_ports,
        _check_addresses,
        _check_names,
        _check_release,
        _check_lame_duck,
        _check_service,
        _check_storage,
        _check_tls,
        _check_logins,
        _check_accounts,
        _check_clients,
    ):
        check(node, bad)
    return problems


Report = Callable[[str], None]


def _check_ports(node: Mapping[str, Any], bad: Report) -> None:
    ports: dict[str, int] = {}
    for variable in PORT_VARIABLES:
        port = _as_int(node.get(variable))
        if port is None:
            bad(f"{variable} {node.get(variable)!r} is not a port number")
        elif not 1 <= port <= 65535:
            bad(f"{variable} {port} is outside 1-65535")
        else:
            ports[variable] = port
    if len(ports) == len(PORT_VARIABLES) and len(set(ports.values())) != len(ports):
        bad(
            "nats_server_client_port, nats_server_cluster_port and nats_server_monitor_port "
            f"must differ (got {', '.join(str(p) for p in ports.values())})"
        )


def _check_addresses(node: Mapping[str, Any], bad: Report) -> None:
    for variable in ADDRESS_VARIABLES:
        value = str(node.get(variable, ""))
        problem = _address_problem(value)
        if problem:
            bad(f"{variable} {value!r} {problem}")
    if str(node.get("nats_server_address")) in UNROUTABLE:
        bad("nats_server_address must be an address peers can reach, not a wildcard")


def _check_names(node: Mapping[str, Any], bad: Report) -> None:
    for variable in ("nats_server_name", "nats_server_cluster_name", "nats_server_jetstream_domain"):
        value = str(node.get(variable, ""))
        if not NAME_RE.match(value):
            bad(f"{variable} {value!r} must be 1-64 letters, digits, '-' or '_' (NATS takes no spaces or dots)")
    for variable in ("nats_server_jetstream_max_memory_store", "nats_server_jetstream_max_file_store"):
        value = str(node.get(variable, ""))
        if not SIZE_RE.match(value):
            bad(f"{variable} {value!r} is not a size like 512MB or 16GB")
    sync = str(node.get("nats_server_jetstream_sync_interval", ""))
    if sync not in ("", "always") and not SYNC_INTERVAL_RE.match(sync):
        bad(f"nats_server_jetstream_sync_interval {sync!r} must be always, a duration like 10s or 2m, or empty")


def _check_release(node: Mapping[str, Any], bad: Report) -> None:
    version = str(node.get("nats_server_version", ""))
    if not VERSION_RE.match(version):
        bad(f"nats_server_version {version!r} is not a release number like 2.15.1")
    source = node.get("nats_server_artifact_source")
    base_url = str(node.get("nats_server_release_base_url", ""))
    if source == "url" and not URL_RE.match(base_url):
        bad(f"nats_server_release_base_url {base_url!r} is not an http(s) URL")
    if source == "controller" and not node.get("nats_server_controller_release_dir"):
        bad("nats_server_controller_release_dir is required with nats_server_artifact_source=controller")


# Whole-number settings with the range that makes sense for each: (least, most, why).
SERVICE_RANGES = {
    # JetStream holds two descriptors per stream, one per connection; the kernel's nr_open caps it.
    "nats_server_limit_nofile": (65536, 1048576, "file descriptors for the server (systemd LimitNOFILE)"),
    "nats_server_health_retries": (1, 600, "/healthz polls after a start or reload"),
    "nats_server_health_delay": (1, 60, "seconds between two /healthz polls"),
}
# -1 turns route pooling off (measured: pooled routes cost the CIM first-fetch 503s).
POOL_SIZES = range(-1, 33)


def _check_service(node: Mapping[str, Any], bad: Report) -> None:
    for variable, (least, most, what) in SERVICE_RANGES.items():
        value = _as_int(node.get(variable))
        if value is None or not least <= value <= most:
            bad(f"{variable} {node.get(variable)!r} must be a whole number {least}-{most} ({what})")
    pool = _as_int(node.get("nats_server_cluster_pool_size"))
    if pool is None or pool not in POOL_SIZES:
        bad(
            f"nats_server_cluster_pool_size {node.get('nats_server_cluster_pool_size')!r} must be -1 "
            "(one route per pair, the default) or 0-32"
        )


def _check_lame_duck(node: Mapping[str, Any], bad: Report) -> None:
    duration = _as_int(node.get("nats_server_lame_duck_duration_seconds"))
    grace = _as_int(node.get("nats_server_lame_duck_grace_period_seconds"))
    if duration is None or duration < LAME_DUCK_MINIMUM_SECONDS:
        bad(f"nats_server_lame_duck_duration_seconds must be at least {LAME_DUCK_MINIMUM_SECONDS} (the NATS minimum)")
    elif grace is None or grace >= duration:
        bad("nats_server_lame_duck_grace_period_seconds must be shorter than the duration")


# Directories the storage role must never chown to the server's account or mount over.
SYSTEM_DIRECTORIES = frozenset(
    {
        "/",
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/home",
        "/lib",
        "/lib64",
        "/media",
        "/mnt",
        "/opt",
        "/proc",
        "/root",
        "/run",
        "/sbin",
        "/srv",
        "/sys",
        "/tmp",
        "/usr",
        "/usr/bin",
        "/usr/lib",
        "/usr/local",
        "/usr/local/bin",
        "/usr/local/sbin",
        "/usr/sbin",
        "/var",
        "/var/cache",
        "/var/lib",
        "/var/log",
        "/var/run",
        "/var/tmp",
    }
)


def path_problem(path: str) -> str | None:
    """Why `path` cannot be a storage directory, or None. Paths are taken only as written: a
    path that normalises to something else (`..`, `//`, `/.`, a trailing slash) is refused, not
    rewritten, so what the role chowns is exactly what the inventory says."""
    if not path.startswith("/"):
        return "must be an absolute path"
    if any(c.isspace() for c in path) or any(ord(c) < 32 for c in path):
        return "must not contain spaces or control characters (systemd's unit paths split on them)"
    if path != posixpath.normpath(path) or path.startswith("//"):
        return f"must be written plainly (no '..', '.', '//' or trailing '/'): it means {posixpath.normpath(path)!r}"
    if path in SYSTEM_DIRECTORIES:
        return "is a system directory: the storage role would take it over"
    return None


def _check_storage(node: Mapping[str, Any], bad: Report) -> None:
    store_dir = str(node.get("nats_server_jetstream_store_dir", ""))
    mount_path = str(node.get("jetstream_storage_mount_path", ""))
    node_dir = str(node.get("jetstream_storage_node_dir", ""))
    paths_ok = True
    for variable, path in (("jetstream_storage_mount_path", mount_path), ("jetstream_storage_node_dir", node_dir)):
        problem = path_problem(path)
        if problem:
            bad(f"{variable} {path!r} {problem}")
            paths_ok = False
    if paths_ok and posixpath.dirname(node_dir) != mount_path:
        bad(
            f"jetstream_storage_node_dir {node_dir!r} must be a directory directly inside "
            f"jetstream_storage_mount_path {mount_path!r}"
        )
    if store_dir != node_dir:
        bad(f"nats_server_jetstream_store_dir {store_dir!r} must be this node's storage directory {node_dir!r}")
    marker = str(node.get("nats_server_jetstream_store_marker", ""))
    expected_marker = posixpath.join(node_dir, str(node.get("jetstream_storage_marker_name", "")))
    if marker != expected_marker:
        bad(f"nats_server_jetstream_store_marker {marker!r} must be the storage role's marker {expected_marker!r}")
    if node.get("jetstream_storage_owner") != node.get("nats_server_user"):
        bad("jetstream_storage_owner and nats_server_user must name the same account")
    if node.get("jetstream_storage_backend") == "nfs":
        _check_nfs_mount(node, bad)


def _check_nfs_mount(node: Mapping[str, Any], bad: Report) -> None:
    source = str(node.get("jetstream_storage_mount_source") or "")
    if not source:
        bad("jetstream_storage_mount_source is required with jetstream_storage_backend=nfs")
    elif not re.fullmatch(r"[^\s:]+:/\S*", source):
        bad(f"jetstream_storage_mount_source {source!r} must be server:/export without spaces")
    written = str(node.get("jetstream_storage_mount_options", ""))
    options = written.split(",")
    if any(not option or option != option.strip() or any(c.isspace() for c in option) for option in options):
        bad(f"jetstream_storage_mount_options {written!r} must be options separated by single commas, no spaces")
    elif "hard" not in options or "soft" in options:
        bad(
            "jetstream_storage_mount_options must include 'hard' and not 'soft' "
            "(a soft mount turns NFS timeouts into JetStream write errors)"
        )


def _check_tls(node: Mapping[str, Any], bad: Report) -> None:
    # Certificates the controller issues itself (nats_pki) are created after the preflight.
    must_exist = not node.get("nats_pki_issue_certificates")
    ca_file = str(node.get("nats_server_tls_ca_file") or "")
    if not ca_file:
        bad("nats_server_tls_ca_file is not set (the CA certificate file on the controller)")
    elif must_exist and not os.path.isfile(ca_file):
        bad(f"nats_server_tls_ca_file {ca_file!r} does not exist on the controller")
    for what in ("cert", "key"):
        path = str(node.get(f"nats_server_tls_{what}_file") or "")
        has_content = bool(node.get(f"nats_server_tls_{what}_content_set"))
        if bool(path) == has_content:
            bad(f"set exactly one of nats_server_tls_{what}_file and nats_server_tls_{what}_content")
        elif path and must_exist and not os.path.isfile(path):
            bad(f"nats_server_tls_{what}_file {path!r} does not exist on the controller")
    timeout = _as_int(node.get("nats_server_tls_timeout_seconds"))
    if timeout is None or not 1 <= timeout <= 60:
        bad("nats_server_tls_timeout_seconds must be 1-60")


def _check_logins(node: Mapping[str, Any], bad: Report) -> None:
    secrets = node.get("secrets") or {}
    for variable in PASSWORD_VARIABLES:
        _check_password(variable, secrets.get(variable) or {}, bad)
    route = secrets.get("nats_server_route_password") or {}
    if route.get("set") and not route.get("url_safe"):
        bad("nats_server_route_password may only use letters, digits, '.', '_', '~' and '-' (it is part of a URL)")


def _check_password(variable: str, summary: Mapping[str, Any], bad: Report) -> None:
    """`summary` is nats_secret_summary's (the preflight never sees a password)."""
    if summary.get("kind", "text") != "text":
        bad(f"{variable} is a {summary['kind']}, not text: quote it in vault.yml")
    elif not summary.get("set"):
        bad(f"{variable} is not set: keep it in the inventory's vault.yml (docs/security.md)")
    elif not MINIMUM_PASSWORD_LENGTH <= summary.get("length", 0) <= BCRYPT_MAXIMUM_BYTES:
        bad(f"{variable} must be {MINIMUM_PASSWORD_LENGTH}-{BCRYPT_MAXIMUM_BYTES} characters long")
    elif summary.get("bytes", 0) > BCRYPT_MAXIMUM_BYTES:
        bad(f"{variable} is {summary['bytes']} bytes in UTF-8; bcrypt reads only the first {BCRYPT_MAXIMUM_BYTES}")


def _check_clients(node: Mapping[str, Any], bad: Report) -> None:
    """The applications of the account: names, vaulted passwords, what they may touch."""
    clients = node.get("nats_server_app_clients")
    if not isinstance(clients, list):
        bad("nats_server_app_clients must be a list of applications (name, password, streams, publish)")
        return
    taken = {str(node.get("nats_server_app_admin_user")), str(node.get("nats_server_system_user"))}
    for index, client in enumerate(clients):
        if not isinstance(client, Mapping):
            bad(f"nats_server_app_clients[{index}] must be a mapping with name, password, streams, publish")
            continue
        name = str(client.get("name", ""))
        label = f"nats_server_app_clients[{index}] ({name or 'no name'})"
        unknown = sorted(set(client) - {"name", "password", "streams", "publish"})
        if unknown:
            bad(f"{label} has unknown keys {', '.join(unknown)} (known: name, password, streams, publish)")
        if not NAME_RE.match(name):
            bad(f"{label}: name must be 1-64 letters, digits, '-' or '_'")
        elif name in taken:
            bad(f"{label}: the user {name!r} is taken (the administrator, the system user or another application)")
        taken.add(name)
        _check_password(f"{label}: password", client.get("password") or {}, bad)
        for key in ("streams", "publish"):
            values = client.get(key, [])
            if not isinstance(values, list) or not all(isinstance(v, str) and v and " " not in v for v in values):
                bad(f"{label}: {key} must be a list of names without spaces")
        for subject in client.get("publish") or []:
            if isinstance(subject, str) and subject.startswith("$"):
                bad(f"{label}: publish {subject!r}: the JetStream API comes with streams, not publish")


# Variables that no longer exist, with what replaced them: set, they would be silently ignored.
REMOVED_VARIABLES = {
    "nats_server_app_user": "nats_server_app_admin_user (the tools) and nats_server_app_clients (each application)",
    "nats_server_app_password": "nats_server_app_admin_password, and each application's password in "
    "nats_server_app_clients",
}


def _check_accounts(node: Mapping[str, Any], bad: Report) -> None:
    for variable, replacement in REMOVED_VARIABLES.items():
        if node.get("removed", {}).get(variable):
            bad(f"{variable} is no longer used: set {replacement} instead (docs/security.md)")
    for variable in (
        "nats_server_app_account",
        "nats_server_system_account",
        "nats_server_app_admin_user",
        "nats_server_system_user",
        "nats_server_route_user",
    ):
        value = str(node.get(variable, ""))
        if not NAME_RE.match(value):
            bad(f"{variable} {value!r} must be 1-64 letters, digits, '-' or '_'")
    if node.get("nats_server_app_account") == node.get("nats_server_system_account"):
        bad("nats_server_app_account and nats_server_system_account must differ")
    if node.get("nats_server_app_admin_user") == node.get("nats_server_system_user"):
        bad("nats_server_app_admin_user and nats_server_system_user must differ")
    limits = node.get("nats_server_app_jetstream_limits")
    if not isinstance(limits, Mapping):
        bad("nats_server_app_jetstream_limits must be a mapping of max_memory, max_file, max_streams, max_consumers")
        return
    unknown = sorted(set(limits) - ACCOUNT_LIMIT_KEYS)
    if unknown:
        bad(f"nats_server_app_jetstream_limits has unknown keys {', '.join(unknown)}")
    for key in ("max_memory", "max_file"):
        if key in limits and not SIZE_RE.match(str(limits[key])):
            bad(f"nats_server_app_jetstream_limits.{key} {limits[key]!r} is not a size like 4GB")
    for key in ("max_streams", "max_consumers"):
        if key in limits and (_as_int(limits[key]) or 0) < 1:
            bad(f"nats_server_app_jetstream_limits.{key} {limits[key]!r} must be a positive whole number")


def _duplicates(nodes: Sequence[Mapping[str, Any]], key: Callable[[Mapping[str, Any]], str]) -> dict[str, list[str]]:
    """Values of `key` that more than one node has, with those nodes' hosts."""
    counts = Counter(key(n) for n in nodes)
    return {
        value: sorted(str(n.get("host")) for n in nodes if key(n) == value)
        for value, count in counts.items()
        if count > 1
    }


def _lowered(variable: str) -> Callable[[Mapping[str, Any]], str]:
    def value(node: Mapping[str, Any]) -> str:
        return str(node.get(variable)).lower()

    return value


def _shared_store(node: Mapping[str, Any]) -> str:
    """Where a node's store lives as far as other nodes can see it: on NFS the export and the
    path; on local disk its own host (the same path on two hosts is two disks)."""
    where = node.get("jetstream_storage_mount_source") if node.get("jetstream_storage_backend") == "nfs" else None
    return f"{where or node.get('host')}\0{node.get('nats_server_jetstream_store_dir')}"


def cluster_problems(nodes: Sequence[Mapping[str, Any] | None], group: str, members: Sequence[str]) -> list[str]:
    """All problems of a cluster: its shape first, then each node's own settings."""
    problems: list[str] = []
    size = len(members)
    if size < 3:
        problems.append(f"group {group} has {size} host(s); a JetStream cluster needs at least 3")
    elif size % 2 == 0:
        problems.append(f"group {group} has {size} hosts; use an odd count so a partition cannot split the vote")
    for hosts in _duplicates([{"host": m} for m in members], lambda n: str(n["host"]).lower()).values():
        problems.append(f"hosts {', '.join(hosts)} differ only in case: DNS and certificates read them as one name")
    known = [n for n in nodes if n is not None]
    # Names and addresses compare as DNS does, ignoring case.
    for variable, what in (("nats_server_name", "server name"), ("nats_server_address", "address")):
        for value, hosts in _duplicates(known, _lowered(variable)).items():
            problems.append(f"{variable} {value!r} is the {what} of more than one host: {', '.join(hosts)}")
    for value, hosts in _duplicates(known, _shared_store).items():
        problems.append(
            f"nats_server_jetstream_store_dir {value.split(chr(0))[1]!r} is the store directory of more than one "
            f"host on the same storage (servers must never share one): {', '.join(hosts)}"
        )
    for variable in ("nats_server_cluster_name", "nats_server_jetstream_domain", "nats_server_version"):
        values = sorted({str(n.get(variable)) for n in known})
        if len(values) > 1:
            problems.append(f"{variable} must be the same on every host (got {', '.join(values)})")
    for node in known:
        problems.extend(node_problems(node))
    return problems


ARGUMENT_TYPE_ERROR = re.compile(
    r"argument '(?P<variable>[^']+)' is of type (?P<given>\w+).*? convert to (?P<wanted>\w+)"
    r"(: The value (?P<value>'[^']*'))?"
)
ARGUMENT_CHOICE_ERROR = re.compile(r"value of (?P<variable>\S+) must be one of: (?P<choices>.*), got: (?P<value>.*)")
TYPE_NAMES = {"bool": "true or false", "int": "a whole number", "str": "text", "list": "a list", "dict": "a mapping"}


def argument_problems(errors: Sequence[str]) -> list[str]:
    """validate_argument_spec's errors as one short clause each, naming the variable."""
    problems = []
    for error in errors:
        wrong_type, wrong_choice = ARGUMENT_TYPE_ERROR.search(error), ARGUMENT_CHOICE_ERROR.search(error)
        if wrong_type:
            wanted = TYPE_NAMES.get(wrong_type["wanted"], wrong_type["wanted"])
            given = wrong_type["value"] or f"(a {wrong_type['given']})"
            problems.append(f"{wrong_type['variable']} {given} must be {wanted}")
        elif wrong_choice:
            problems.append(
                f"{wrong_choice['variable']} must be one of {wrong_choice['choices']} (got {wrong_choice['value']!r})"
            )
        else:
            problems.append(error)
    return problems


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Any]:
        return {"nats_cluster_problems": cluster_problems, "nats_argument_problems": argument_problems}
