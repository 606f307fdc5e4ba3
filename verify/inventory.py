"""The cluster as the Ansible inventory describes it, with variables rendered as the roles see them.

The deploy and verify read the same facts from the same place: inventory group_vars/host_vars over
the roles' defaults (Ansible's own precedence: role defaults lowest), templated by Ansible itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ansible.inventory.manager import InventoryManager
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar, trust_as_template
from ansible.vars.manager import VariableManager

REPO = Path(__file__).resolve().parent.parent
ROLES = ("jetstream_storage", "nats_server")
CLUSTER_GROUP = "nats_cluster"
# How verify reaches a host over SSH: the same variables the deploy used.
CONNECTION_VARIABLES = (
    "ansible_user",
    "ansible_port",
    "ansible_become",
    "ansible_ssh_private_key_file",
    "ansible_ssh_common_args",
)


@dataclass(frozen=True)
class Node:
    """One cluster member, with the settings verify checks it against."""

    host: str
    address: str
    settings: dict[str, Any]
    connection: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.settings[name]

    @property
    def server_name(self) -> str:
        return str(self.settings["nats_server_name"])

    @property
    def monitor_url(self) -> str:
        host = str(self.settings["nats_server_monitor_host"]).replace("0.0.0.0", self.address)
        return f"http://{host}:{self.settings['nats_server_monitor_port']}"

    def testinfra_spec(self) -> tuple[str, dict[str, Any]]:
        """(host spec, options) for testinfra.get_host, over the inventory's SSH settings."""
        user = self.connection.get("ansible_user")
        port = self.connection.get("ansible_port")
        spec = f"ssh://{user + '@' if user else ''}{self.address}{':' + str(port) if port else ''}"
        options: dict[str, Any] = {
            "sudo": bool(self.connection.get("ansible_become")),
            "ssh_extra_args": " ".join(
                [str(self.connection.get("ansible_ssh_common_args", "")), "-o ConnectTimeout=3 -o BatchMode=yes"]
            ).strip(),
            # One SSH connection per host for the whole run (testinfra needs the path to share it).
            "controlpersist": 10,
            "controlpath": f"/tmp/nats-verify-{self.host}.ssh",
            "timeout": 10,
        }
        if self.connection.get("ansible_ssh_private_key_file"):
            options["ssh_identity_file"] = str(Path(self.connection["ansible_ssh_private_key_file"]).resolve())
        return spec, options

    @property
    def client_url(self) -> str:
        host = str(self.settings["nats_server_client_host"]).replace("0.0.0.0", self.address)
        return f"nats://{host}:{self.settings['nats_server_client_port']}"


@dataclass(frozen=True)
class Cluster:
    inventory: Path
    nodes: tuple[Node, ...]

    def node(self, host: str) -> Node:
        for node in self.nodes:
            if node.host == host:
                return node
        raise KeyError(f"{host} is not in {self.inventory} (hosts: {', '.join(n.host for n in self.nodes)})")

    @property
    def client_urls(self) -> list[str]:
        return [n.client_url for n in self.nodes]

    def setting(self, name: str) -> Any:
        """A setting every node shares (cluster name, domain, version ...)."""
        values = {repr(n.settings[name]) for n in self.nodes}
        if len(values) != 1:
            raise ValueError(f"{name} differs between nodes: {sorted(values)}")
        return self.nodes[0].settings[name]


def _trusted(value: Any) -> Any:
    """Marks the strings of our own role defaults as templates, as Ansible does for role files."""
    if isinstance(value, str):
        return trust_as_template(value)
    if isinstance(value, dict):
        return {k: _trusted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_trusted(v) for v in value]
    return value


def _role_defaults() -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    for role in ROLES:
        defaults.update(yaml.safe_load((REPO / "roles" / role / "defaults" / "main.yml").read_text()) or {})
    return dict(_trusted(defaults))


def load_cluster(inventory: Path | str, group: str = CLUSTER_GROUP) -> Cluster:
    """Reads the inventory offline (nothing is contacted) and renders each member's settings."""
    path = Path(inventory).resolve()
    if not path.exists():
        raise FileNotFoundError(f"inventory {path} does not exist")
    loader = DataLoader()
    manager = InventoryManager(loader=loader, sources=[str(path)])
    variables = VariableManager(loader=loader, inventory=manager)
    members = manager.get_groups_dict().get(group)
    if not members:
        raise ValueError(f"inventory {path} has no hosts in group {group!r}")
    defaults = _role_defaults()
    nodes = []
    for name in members:
        host = manager.get_host(name)
        host_vars = dict(defaults) | dict(variables.get_vars(host=host)) | {"inventory_hostname": name}
        templar = Templar(loader=loader, variables=host_vars)
        wanted = {k: v for k, v in host_vars.items() if k.startswith(("nats_server_", "jetstream_", "lab_"))}
        settings = {k: templar.template(v) for k, v in wanted.items()}
        address = str(templar.template(host_vars.get("ansible_host", name)))
        connection = {k: templar.template(v) for k, v in host_vars.items() if k in CONNECTION_VARIABLES}
        nodes.append(Node(host=name, address=address, settings=settings, connection=connection))
    return Cluster(inventory=path, nodes=tuple(nodes))
