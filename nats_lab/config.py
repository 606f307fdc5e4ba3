"""Where things are: the repo, the lab inventory, the .lab/ state dir and the cache."""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

INVENTORY = Path("inventory/lab/hosts.yml")
CLUSTER_GROUP = "nats_cluster"
# Hosts that watch the cluster from outside its site: up, down, ssh and single-host faults reach
# them; a site-wide fault (power-loss all) does not.
MONITORING_GROUP = "nats_monitoring"
# Hosts that run the scheduled backup (playbooks/backup-schedule.yml): lab machines that see the
# checkout, read-only at its own path, so the job runs this repository as an operations host would.
BACKUP_GROUP = "nats_backup_host"
CACHE_NAME = "cim-nats-infra"
# IFNAMSIZ - 1: longer names are hashed by systemd-nspawn and could not be predicted here.
MAX_IFNAME = 15


class LabError(Exception):
    """An error to report to the user in one line, without a traceback."""


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    prefix: int

    @property
    def veth(self) -> str:
        """The machine side of the container's veth (systemd-nspawn --network-bridge)."""
        return f"vb-{self.name}"


@dataclass(frozen=True)
class Lab:
    repo: Path
    bridge: str
    bridge_address: str
    prefix: int
    mirror_port: int
    hosts: tuple[Host, ...]
    ssh_user: str
    ssh_key: Path
    ssh_common_args: tuple[str, ...]
    monitors: tuple[Host, ...] = ()
    backup_hosts: frozenset[str] = frozenset()
    # A file every lab host has, telling the preflight that lab addresses are on its own link.
    host_marker: str = "/etc/cim-nats-lab-host"

    @property
    def machines(self) -> tuple[Host, ...]:
        """Every lab host: the cluster's, then the monitoring hosts."""
        return self.hosts + self.monitors

    @property
    def state(self) -> Path:
        return self.repo / ".lab"

    @property
    def hosts_dir(self) -> Path:
        return self.state / "hosts"

    @property
    def share_dir(self) -> Path:
        return self.state / "share"

    @property
    def mirror_dir(self) -> Path:
        return self.state / "mirror"

    @property
    def mirror_url(self) -> str:
        return f"http://{self.bridge_address}:{self.mirror_port}"

    def host(self, name: str) -> Host:
        for host in self.machines:
            if host.name == name:
                return host
        valid = ", ".join(h.name for h in self.machines)
        raise LabError(f"unknown host {name!r}; valid hosts: {valid}")

    def host_dir(self, host: Host) -> Path:
        return self.hosts_dir / host.name


def cache_dir() -> Path:
    """Outside the checkout, so a fresh clone or `git clean` keeps the slow-to-build parts."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / CACHE_NAME


def find_repo(explicit: str | None = None) -> Path:
    """The checkout that holds inventory/lab/hosts.yml: --repo, the package's, or cwd's."""
    if explicit:
        repo = Path(explicit).resolve()
        if not (repo / INVENTORY).is_file():
            raise LabError(f"{repo} has no {INVENTORY}")
        return repo
    candidates = [Path(__file__).resolve().parent.parent]
    cwd = Path.cwd().resolve()
    candidates += [cwd, *cwd.parents]
    for candidate in candidates:
        if (candidate / INVENTORY).is_file():
            return candidate
    raise LabError(f"cannot find the repo ({INVENTORY} not found); pass --repo")


def _resolve_inventory_path(value: str, inventory_dir: Path) -> Path:
    # The inventory writes the key path as a Jinja expression on inventory_dir.
    text = re.sub(r"\{\{\s*inventory_dir\s*\}\}", str(inventory_dir), value)
    if "{{" in text:
        raise LabError(f"cannot resolve {value!r} from the inventory")
    return Path(os.path.normpath(inventory_dir / text))


def load_lab(repo: Path) -> Lab:
    path = repo / INVENTORY
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
        top = data["all"]
        gvars: dict[str, Any] = top.get("vars") or {}
        bridge_if = ipaddress.IPv4Interface(str(gvars["lab_bridge_address"]))

        def group_hosts(group: str) -> tuple[Host, ...]:
            found = []
            for name, hvars in ((top["children"].get(group) or {}).get("hosts") or {}).items():
                address = ipaddress.IPv4Address(str(hvars["ansible_host"]))
                if address not in bridge_if.network:
                    raise LabError(f"{name}: {address} is outside the lab subnet {bridge_if.network}")
                found.append(Host(name=str(name), address=str(address), prefix=bridge_if.network.prefixlen))
            return tuple(found)

        hosts = group_hosts(CLUSTER_GROUP)
        if not hosts:
            raise KeyError(CLUSTER_GROUP)
        lab = Lab(
            repo=repo,
            bridge=str(gvars["lab_bridge_name"]),
            bridge_address=str(bridge_if.ip),
            prefix=bridge_if.network.prefixlen,
            mirror_port=int(gvars["lab_mirror_port"]),
            hosts=hosts,
            monitors=group_hosts(MONITORING_GROUP),
            backup_hosts=frozenset(str(name) for name in (top["children"].get(BACKUP_GROUP) or {}).get("hosts") or {}),
            host_marker=str(gvars["lab_host_marker"]),
            ssh_user=str(gvars.get("ansible_user", "ansible")),
            ssh_key=_resolve_inventory_path(str(gvars["ansible_ssh_private_key_file"]), path.parent),
            ssh_common_args=tuple(shlex.split(str(gvars.get("ansible_ssh_common_args", "")))),
        )
    except (KeyError, TypeError, ValueError, yaml.YAMLError) as exc:
        raise LabError(f"{path}: cannot read the lab layout: {exc!r}") from exc
    for host in lab.machines:
        if len(host.veth) > MAX_IFNAME:
            raise LabError(f"host name {host.name!r} is too long for an interface name")
    unknown = sorted(lab.backup_hosts - {host.name for host in lab.machines})
    if unknown:
        raise LabError(f"{path}: {BACKUP_GROUP} names {', '.join(unknown)}, not a lab machine")
    if len(lab.bridge) > MAX_IFNAME:
        raise LabError(f"bridge name {lab.bridge!r} is too long")
    return lab
