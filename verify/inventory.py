"""The cluster as the Ansible inventory describes it, with variables rendered as the roles see them.

The deploy and verify read the same facts from the same place: inventory group_vars/host_vars over
the roles' defaults (Ansible's own precedence: role defaults lowest), templated by Ansible itself.
"""

from __future__ import annotations

import contextlib
import io
import os
import ssl
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ansible import constants
from ansible.cli import CLI
from ansible.errors import AnsibleError
from ansible.inventory.manager import IGNORED, InventoryManager
from ansible.parsing.dataloader import DataLoader
from ansible.parsing.vault import VaultSecretsContext
from ansible.template import Templar, trust_as_template
from ansible.vars.manager import VariableManager

from verify import monitor

REPO = Path(__file__).resolve().parent.parent
ROLES = ("jetstream_storage", "nats_server", "nats_exporter")
# The variables a Node's settings hold: the roles' and the lab's.
SETTING_PREFIXES = ("nats_server_", "nats_exporter_", "jetstream_", "lab_")
# Secrets: kept out of Node.settings (which reports may print); held by Login and Cluster.secrets.
PASSWORD_VARIABLES = ("nats_server_app_admin_password", "nats_server_system_password", "nats_server_route_password")
# The applications' passwords sit inside this list; it is read like the passwords above.
CLIENTS_VARIABLE = "nats_server_app_clients"
SECRET_VARIABLES = (*PASSWORD_VARIABLES, "nats_server_tls_key_content", CLIENTS_VARIABLE)
CLUSTER_GROUP = "nats_cluster"
# Ansible reads group_vars/host_vars beside the inventory it is given, never in its sub-directories.
VARS_DIRECTORIES = ("group_vars", "host_vars")
# Beyond this many directories a path is a tree, not an inventory (`-i /` would walk the disk).
MOST_DIRECTORIES = 500
# How verify reaches a host over SSH: the same variables the deploy used.
CONNECTION_VARIABLES = (
    "ansible_user",
    "ansible_port",
    "ansible_become",
    "ansible_ssh_private_key_file",
    "ansible_ssh_common_args",
)


@dataclass(frozen=True)
class Login:
    """A user of the cluster; the password never shows in a repr."""

    user: str
    password: str = field(repr=False)


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
        return f"https://{host}:{self.settings['nats_server_monitor_port']}"

    def testinfra_spec(self, connect_timeout: int = 3) -> tuple[str, dict[str, Any]]:
        """(host spec, options) for testinfra.get_host, over the inventory's SSH settings."""
        user = self.connection.get("ansible_user")
        port = self.connection.get("ansible_port")
        spec = f"ssh://{user + '@' if user else ''}{self.address}{':' + str(port) if port else ''}"
        options: dict[str, Any] = {
            "sudo": bool(self.connection.get("ansible_become")),
            "ssh_extra_args": " ".join(
                [
                    str(self.connection.get("ansible_ssh_common_args", "")),
                    f"-o ConnectTimeout={connect_timeout} -o BatchMode=yes",
                ]
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
        return f"tls://{host}:{self.settings['nats_server_client_port']}"


@dataclass(frozen=True)
class Cluster:
    inventory: Path
    nodes: tuple[Node, ...]
    # The CA on the controller that signed every member's certificate.
    ca_file: Path
    # The application account's administrator: verify's own checks log in as this user.
    admin: Login
    system: Login
    # The applications declared in the inventory, by name (their least-privilege users).
    clients: dict[str, Login] = field(repr=False, default_factory=dict)
    # Every secret the deploy handles, by where it comes from ("nats_server_route_password",
    # "nats-1 private key"): what must never show in a log.
    secrets: dict[str, str] = field(repr=False, default_factory=dict)

    def tls_context(self) -> ssl.SSLContext:
        """Trusts the cluster's CA only, and checks each server's name (its IP SAN)."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def login(self, who: Login | None = None) -> dict[str, Any]:
        """nats.connect keywords: TLS with the cluster's CA, as `who` (the administrator by default)."""
        who = who or self.admin
        return {"user": who.user, "password": who.password, "tls": self.tls_context()}

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


def _loader_with_vault() -> DataLoader:
    """A DataLoader that opens vaulted values with the vault ids Ansible itself is configured with
    (ANSIBLE_VAULT_IDENTITY_LIST / ANSIBLE_VAULT_PASSWORD_FILE; the Makefile sets the lab's).
    Read now, not at import: the settings may have been set after Ansible was imported."""
    loader = DataLoader()
    vault_ids = constants.config.get_config_value("DEFAULT_VAULT_IDENTITY_LIST") or []
    password_file = constants.config.get_config_value("DEFAULT_VAULT_PASSWORD_FILE")
    secrets = CLI.setup_vault_secrets(
        loader,
        vault_ids=list(vault_ids),
        vault_password_files=[password_file] if password_file else [],
        auto_prompt=False,
        # ansible-core 2.19 allows the process-wide context to be set once: a second inventory
        # read in the same process (tests, a caller that loads two) keeps the first one's.
        initialize_context=False,
    )
    loader.set_vault_secrets(secrets)
    if VaultSecretsContext.current(optional=True) is None:
        VaultSecretsContext.initialize(VaultSecretsContext(secrets))
    return loader


class InventoryRefused(ValueError):
    """An inventory verify will not aim at; the message names the path and the problem."""


def _subdirectories(path: Path) -> list[Path]:
    """The directories under `path` that Ansible descends into when given `path`."""
    found: list[Path] = []
    for parent, names, _ in os.walk(path):
        names[:] = sorted(n for n in names if not IGNORED.search(n.encode()))
        found += [Path(parent, n) for n in names]
        if len(found) > MOST_DIRECTORIES:
            raise InventoryRefused(f"inventory {path}: more than {MOST_DIRECTORIES} directories, not an inventory")
    return found


def _several(path: Path, inventories: list[Path]) -> InventoryRefused:
    names = ", ".join(
        (str(i.relative_to(path)) if i != path else "its own files") if i.is_relative_to(path) else str(i)
        for i in inventories
    )
    return InventoryRefused(f"inventory {path}: holds several inventories ({names}); name one of them")


def inventory_path(inventory: Path | str) -> Path:
    """The inventory's path, refused before Ansible reads anything when it cannot be one inventory."""
    if not str(inventory).strip():
        # Ansible would take the current directory and merge every inventory under it.
        raise InventoryRefused(
            f"inventory {str(inventory)!r}: empty path (Ansible would read the whole current directory); "
            "name one, e.g. inventory/lab"
        )
    path = Path(inventory).expanduser().resolve()
    if not path.exists():
        raise InventoryRefused(f"inventory {path}: does not exist")
    if not (path.is_dir() or path.is_file()):
        raise InventoryRefused(f"inventory {path}: neither a directory nor a file")
    if path.is_file() and path.stat().st_size == 0:
        raise InventoryRefused(f"inventory {path}: empty file")
    if path.is_dir() and not [n for n in os.listdir(path) if not IGNORED.search(n.encode())]:
        raise InventoryRefused(f"inventory {path}: empty (no file Ansible would read in it)")
    if path.is_dir():
        nested = [d for d in _subdirectories(path) if any((d / v).is_dir() for v in VARS_DIRECTORIES)]
        if nested:
            raise _several(path, nested)
    return path


class _SourcedInventory(InventoryManager):  # type: ignore[misc]
    """InventoryManager that notes which file declared or changed each host: given a directory,
    Ansible merges every file under it, the last one's address winning."""

    def __init__(self, loader: DataLoader, source: Path) -> None:
        self.parsed: list[str] = []
        self.sources: dict[str, set[str]] = defaultdict(set)
        self.addresses: dict[str, dict[str, str]] = defaultdict(dict)
        super().__init__(loader=loader, sources=[str(source)], parse=False)

    def _hosts(self) -> dict[str, Any]:
        return {name: (sorted(g.name for g in host.groups), dict(host.vars)) for name, host in self.hosts.items()}

    def parse_source(self, source: str, cache: bool = False) -> bool:
        if os.path.isdir(source):
            return bool(super().parse_source(source, cache=cache))
        before = self._hosts()
        parsed = bool(super().parse_source(source, cache=cache))
        if parsed:
            self.parsed.append(source)
            for name, now in self._hosts().items():
                if before.get(name) != now:
                    self.sources[name].add(source)
                    if "ansible_host" in now[1]:
                        self.addresses[name][source] = str(now[1]["ansible_host"])
        return parsed


def _read_inventory(loader: DataLoader, path: Path, group: str) -> tuple[InventoryManager, list[str]]:
    """The inventory and its members of `group`, refused when they come from more than one place."""
    manager = _SourcedInventory(loader, path)
    noise = io.StringIO()
    # Ansible warns about every file it cannot read; for a refused path the refusal says it all.
    with contextlib.redirect_stderr(noise):
        manager.parse_sources(cache=True)
    if not manager.parsed:
        raise InventoryRefused(f"inventory {path}: not an inventory Ansible can read")
    members = list(manager.get_groups_dict().get(group) or [])
    if not members:
        raise InventoryRefused(f"inventory {path}: no hosts in group {group!r}")
    places = {Path(s).parent for m in members for s in manager.sources[m]}
    if len(places) > 1:
        raise _several(path, sorted(places))
    for member in members:
        addresses = manager.addresses[member]
        if len(set(addresses.values())) > 1:
            given = ", ".join(f"{a} in {Path(s).name}" for s, a in sorted(addresses.items()))
            raise InventoryRefused(f"inventory {path}: {member} has more than one address ({given})")
    sys.stderr.write(noise.getvalue())
    return manager, members


def load_cluster(inventory: Path | str, group: str = CLUSTER_GROUP) -> Cluster:
    """Reads the inventory offline (nothing is contacted) and renders each member's settings.
    Raises InventoryRefused for a path that is not exactly one inventory holding `group`."""
    path = inventory_path(inventory)
    loader = _loader_with_vault()
    manager, members = _read_inventory(loader, path, group)
    variables = VariableManager(loader=loader, inventory=manager)
    defaults = _role_defaults()
    nodes = []
    logins: dict[str, Any] = {}
    clients: dict[str, Login] = {}
    for name in members:
        host = manager.get_host(name)
        host_vars = dict(defaults) | dict(variables.get_vars(host=host)) | {"inventory_hostname": name}
        templar = Templar(loader=loader, variables=host_vars)
        wanted = {k: v for k, v in host_vars.items() if k.startswith(SETTING_PREFIXES)}
        settings = {k: templar.template(v) for k, v in wanted.items() if k not in SECRET_VARIABLES}
        for variable in (*PASSWORD_VARIABLES, CLIENTS_VARIABLE):
            if variable not in host_vars:
                if variable == CLIENTS_VARIABLE:
                    continue
                raise ValueError(f"{name}: {variable} is not set in inventory {path} (vaulted: docs/security.md)")
            try:
                value = templar.template(host_vars[variable])
            except AnsibleError as error:
                raise ValueError(
                    f"{name}: cannot read {variable} from inventory {path} ({error.message}); give the vault's "
                    "password as Ansible takes it: ANSIBLE_VAULT_IDENTITY_LIST or ANSIBLE_VAULT_PASSWORD_FILE "
                    "(the lab: `make verify` sets it)"
                ) from error
            if variable == CLIENTS_VARIABLE:
                clients = {str(c["name"]): Login(str(c["name"]), str(c.get("password") or "")) for c in value or []}
                settings[CLIENTS_VARIABLE] = [{k: v for k, v in c.items() if k != "password"} for c in value or []]
                logins |= {f"{client} password": login.password for client, login in clients.items()}
            else:
                logins[variable] = value
        key = templar.template(host_vars.get("nats_server_tls_key_content") or "")
        key_file = settings.get("nats_server_tls_key_file")
        if not key and key_file and Path(key_file).is_file():
            key = Path(key_file).read_text()
        if key:
            logins[f"{name} private key"] = key
        address = str(templar.template(host_vars.get("ansible_host", name)))
        connection = {k: templar.template(v) for k, v in host_vars.items() if k in CONNECTION_VARIABLES}
        nodes.append(Node(host=name, address=address, settings=settings, connection=connection))
    first = nodes[0].settings
    cluster = Cluster(
        inventory=path,
        nodes=tuple(nodes),
        ca_file=Path(first["nats_server_tls_ca_file"]).resolve(),
        admin=Login(first["nats_server_app_admin_user"], logins["nats_server_app_admin_password"]),
        system=Login(first["nats_server_system_user"], logins["nats_server_system_password"]),
        clients=clients,
        secrets=dict(logins),
    )
    monitor.trust([n.monitor_url for n in nodes], cluster.ca_file)
    return cluster
