"""site.yml refuses malformed inventories in preflight, naming the problem, and touches no host.

Each case is the lab inventory with one thing broken, run offline (tests/offline.py: an empty
network and an ssh that refuses and records), so "no host touched" is observed, not assumed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.offline import assert_one_short_refusal, make_inventory, run_offline_playbook

CASES: dict[str, tuple[dict[str, Any], str]] = {
    # name: ({"host_vars": {...}} / {"group_vars": {...}} / {"drop_hosts": n} / {"add_host": {...}}, expected text)
    "two hosts": ({"drop_hosts": 1}, "has 2 host(s); a JetStream cluster needs at least 3"),
    "four hosts": ({"add_host": {"ansible_host": "10.231.20.14"}}, "use an odd count"),
    "duplicate address": (
        {"host_vars": {"nats-2": {"ansible_host": "10.231.20.11"}}},
        "'10.231.20.11' is the address of more than one host",
    ),
    "duplicate server name": (
        {"host_vars": {"nats-2": {"nats_server_name": "nats-1"}}},
        "'nats-1' is the server name of more than one host",
    ),
    "shared store dir": (
        {"host_vars": {"nats-3": {"jetstream_storage_node_dir": "/mnt/cimstor-jetstream/nats-1"}}},
        "is the store directory of more than one host on the same storage",
    ),
    "port out of range": (
        {"group_vars": {"nats_server_client_port": 99999}},
        "nats_server_client_port 99999 is outside 1-65535",
    ),
    "ports collide": ({"group_vars": {"nats_server_monitor_port": 4222}}, "must differ"),
    "exporter port taken": (
        {"host_vars": {"nats-2": {"nats_exporter_port": 8222}}},
        "nats-2: nats_exporter_port 8222 must be a port in 1-65535 other than",
    ),
    "exporter port not a number": ({"group_vars": {"nats_exporter_port": "http"}}, "nats_exporter_port"),
    "exporter monitor not https": (
        {"group_vars": {"nats_exporter_monitor_url": "http://10.231.20.11:8222"}},
        'nats_exporter_monitor_url "http://10.231.20.11:8222" must be',
    ),
    "invalid address": (
        {"host_vars": {"nats-1": {"ansible_host": "10.231.20.256"}}},
        "nats_server_address '10.231.20.256' is not a valid",
    ),
    "name with a space": (
        {"group_vars": {"nats_server_cluster_name": "phx cluster"}},
        "nats_server_cluster_name 'phx cluster'",
    ),
    "size that does not parse": (
        {"group_vars": {"nats_server_jetstream_max_memory_store": "1 gig"}},
        "max_memory_store '1 gig' is not a size",
    ),
    "store dir outside the mount": (
        {"group_vars": {"nats_server_jetstream_store_dir": "/var/lib/nats"}},
        "nats_server_jetstream_store_dir '/var/lib/nats'",
    ),
    "version not pinned": ({"group_vars": {"nats_server_version": "latest"}}, "nats_server_version 'latest'"),
    "checksum source missing": (
        {"group_vars": {"nats_server_artifact_source": "controller", "nats_server_controller_release_dir": ""}},
        "nats_server_controller_release_dir is required",
    ),
    "unknown storage backend": ({"group_vars": {"jetstream_storage_backend": "ceph"}}, "jetstream_storage_backend"),
    "soft nfs mount": ({"group_vars": {"jetstream_storage_mount_options": "rw,soft"}}, "must include 'hard'"),
    "password missing": (
        {"group_vars": {"nats_server_app_admin_password": ""}},
        "nats_server_app_admin_password is not set",
    ),
    "application password missing": (
        {"group_vars": {"nats_server_client_cim_password": ""}},
        "nats_server_app_clients[0] (cim): password is not set",
    ),
    "password longer than bcrypt reads": (
        {"group_vars": {"nats_server_system_password": "é" * 40}},
        "is 80 bytes in UTF-8",
    ),
    "removed variable still set": (
        {"group_vars": {"nats_server_app_password": "an-old-style-app-password-x7"}},
        "nats_server_app_password is no longer used: set nats_server_app_admin_password",
    ),
    "application named like the administrator": (
        {"group_vars": {"nats_server_app_admin_user": "cim"}},
        "the user 'cim' is taken",
    ),
    "password too short": (
        {"group_vars": {"nats_server_system_password": "tiny-pw-7x"}},
        "nats_server_system_password must be 16-72 characters long",
    ),
    "route password breaks the URL": (
        {"group_vars": {"nats_server_route_password": "has/slash@and:colon-x7q"}},
        "nats_server_route_password may only use letters, digits",
    ),
    "key given twice": (
        {"group_vars": {"nats_server_tls_key_content": "-----BEGIN PRIVATE KEY-----\nx7q\n-----END PRIVATE KEY-----"}},
        "set exactly one of nats_server_tls_key_file and nats_server_tls_key_content",
    ),
    "certificate file missing": (
        {"group_vars": {"nats_pki_issue_certificates": False, "nats_server_tls_ca_file": "/nonexistent/ca.crt"}},
        "nats_server_tls_ca_file '/nonexistent/ca.crt' does not exist on the controller",
    ),
    "one user for two accounts": (
        {"group_vars": {"nats_server_system_user": "admin"}},
        "nats_server_app_admin_user and nats_server_system_user must differ",
    ),
    # Paths: what the storage role would chown, mount over or hand to systemd.
    "store dir up a level": (
        {"host_vars": {"nats-2": {"jetstream_storage_node_dir": "/mnt/cimstor-jetstream/.."}}},
        "jetstream_storage_node_dir '/mnt/cimstor-jetstream/..' must be written plainly",
    ),
    "another node's dir behind a double slash": (
        {"host_vars": {"nats-3": {"jetstream_storage_node_dir": "/mnt/cimstor-jetstream//nats-1"}}},
        "it means '/mnt/cimstor-jetstream/nats-1'",
    ),
    "root behind a dot-dot mount": (
        {"group_vars": {"jetstream_storage_backend": "local", "jetstream_storage_mount_path": "/var/.."}},
        "jetstream_storage_mount_path '/var/..' must be written plainly",
    ),
    "a system directory as the parent": (
        {"group_vars": {"jetstream_storage_backend": "local", "jetstream_storage_mount_path": "/etc"}},
        "jetstream_storage_mount_path '/etc' is a system directory",
    ),
    "store dir with a space": (
        {"host_vars": {"nats-1": {"jetstream_storage_node_dir": "/mnt/cimstor-jetstream/nats 1"}}},
        "must not contain spaces",
    ),
    "mount options with a space": (
        {"group_vars": {"jetstream_storage_mount_options": "rw,hard, soft"}},
        "jetstream_storage_mount_options 'rw,hard, soft' must be options separated by single commas",
    ),
    # Values of the wrong kind or out of range.
    "no file descriptors": ({"group_vars": {"nats_server_limit_nofile": 0}}, "nats_server_limit_nofile 0 must be"),
    "negative health retries": (
        {"group_vars": {"nats_server_health_retries": -1}},
        "nats_server_health_retries -1 must be a whole number 1-600",
    ),
    "negative account limit": (
        {"group_vars": {"nats_server_app_jetstream_limits": {"max_streams": -5}}},
        "max_streams -5 must be a positive whole number",
    ),
    "a yes/no that is neither": (
        {"group_vars": {"nats_server_upgrade": "nope"}},
        "nats-1: nats_server_upgrade 'nope' must be true or false",
    ),
    "a choice that is not one": (
        {"group_vars": {"nats_server_artifact_source": "ftp"}},
        "nats_server_artifact_source must be one of url, controller (got 'ftp')",
    ),
    "password given as a number": (
        {"group_vars": {"nats_server_system_password": 1234567890123456789}},
        "nats_server_system_password is a number, not text: quote it",
    ),
    "IPv6 address": (
        {"host_vars": {"nats-2": {"ansible_host": "fd00:231::12"}}},
        "nats_server_address 'fd00:231::12' is an IPv6 address",
    ),
    "host names differing in case": ({"rename_host": ("nats-2", "NATS-1")}, "NATS-1, nats-1 differ only in case"),
    "cluster group misspelt": (
        {"group_vars": {"nats_server_cluster_group": "nats_clustr"}},
        'nats_server_cluster_group "nats_clustr" is not a group of this inventory '
        "(its groups: nats_backup_host, nats_cluster, nats_monitoring)",
    ),
    "a list where a number belongs": (
        {"group_vars": {"nats_server_client_port": [4222]}},
        "nats_server_client_port (a list) must be a whole number",
    ),
    "unknown account limit": (
        {"group_vars": {"nats_server_app_jetstream_limits": {"max_files": "1GB"}}},
        "nats_server_app_jetstream_limits has unknown keys max_files",
    ),
}
# Secrets a case sets: the refusal must name the variable, never show the value.
SECRET_KEYS = (
    "nats_server_app_password",
    "nats_server_app_admin_password",
    "nats_server_client_cim_password",
    "nats_server_system_password",
    "nats_server_route_password",
)


@pytest.mark.parametrize("case", sorted(CASES))
def test_site_refuses_broken_inventory_before_touching_hosts(case: str, tmp_path: Path) -> None:
    change, expected = CASES[case]
    run = run_offline_playbook("site.yml", make_inventory(tmp_path, change), tmp_path=tmp_path)
    output = run.output
    assert run.result.returncode != 0, output
    assert expected in output, output
    assert "Preflight |" in output
    assert "Deploy |" not in output, "a deploy play started after a failed preflight"
    assert run.ssh_calls == [], "preflight connected to a host"
    assert_one_short_refusal(output)
    for key, value in change.get("group_vars", {}).items():
        if key in SECRET_KEYS and value:
            assert str(value) not in output, f"{key}'s value shows in the output"


def test_the_unbroken_copy_passes_preflight(tmp_path: Path) -> None:
    """Control: the copied lab inventory itself is accepted, so each failure above is its own."""
    run = run_offline_playbook("preflight.yml", make_inventory(tmp_path, {}), tmp_path=tmp_path)
    assert run.result.returncode == 0, run.output
    assert run.ssh_calls == []


# Valid inventories that look unusual: preflight must accept them.
ACCEPTED: dict[str, dict[str, Any]] = {
    # Each host's own disk: one path on every host is three directories.
    "local disks, one path everywhere": {
        "group_vars": {
            "jetstream_storage_backend": "local",
            "jetstream_storage_mount_path": "/srv/nats",
            "jetstream_storage_node_dir": "/srv/nats/jetstream",
        }
    },
    "a host name in capitals": {"rename_host": ("nats-2", "NATS-2")},
    "a password with every byte bcrypt reads": {"group_vars": {"nats_server_system_password": "é" * 36}},
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_a_valid_unusual_inventory_passes_preflight(case: str, tmp_path: Path) -> None:
    run = run_offline_playbook("preflight.yml", make_inventory(tmp_path, ACCEPTED[case]), tmp_path=tmp_path)
    assert run.result.returncode == 0, run.output[-3000:]
    assert run.ssh_calls == []


@pytest.mark.parametrize(
    "playbook",
    [
        "site.yml",
        "rolling-restart.yml",
        "remediate/remount-storage.yml",
        "remediate/reset-jetstream.yml",
        "remediate/purge-consumers.yml",
        "backup-streams.yml",
        "remediate/restore-streams.yml",
    ],
)
def test_a_play_limited_to_part_of_the_cluster_is_refused_before_touching_hosts(playbook: str, tmp_path: Path) -> None:
    """Their health and quorum checks ask every member, so --limit is refused up front."""
    inventory = make_inventory(tmp_path, {})
    run = run_offline_playbook(playbook, inventory, "--limit", "nats-2", tmp_path=tmp_path)
    output = " ".join(run.output.split())
    assert run.result.returncode != 0, output[-2000:]
    assert "run it without --limit (left out: nats-1, nats-3)" in output, output[-2000:]
    assert run.ssh_calls == [], "a limited play connected to a host"
