"""site.yml refuses malformed inventories in preflight, naming the problem, and touches no host.

Each case is the lab inventory with one thing broken. ssh is replaced by a wrapper that records
every call before handing over to the real ssh, so "no host touched" is observed, not assumed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import LAB_INVENTORY, ansible_env, run_playbook

NEW_EVENT_STORE = {"name": "INFRASTRUCTURE_EVENTS", "subjects": ["infrastructure.>"], "storage": "file", "replicas": 3}
OLD_EVENT_STORE = NEW_EVENT_STORE | {"retention": "limits", "max_age": "30d", "max_bytes": "10GB"}

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
        "is the store directory (servers must never share one) of more than one host",
    ),
    "port out of range": (
        {"group_vars": {"nats_server_client_port": 99999}},
        "nats_server_client_port 99999 is outside 1-65535",
    ),
    "ports collide": ({"group_vars": {"nats_server_monitor_port": 4222}}, "must differ"),
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
    "unknown account limit": (
        {"group_vars": {"nats_server_app_jetstream_limits": {"max_files": "1GB"}}},
        "nats_server_app_jetstream_limits has unknown keys max_files",
    ),
    # Today's production declaration: events deleted after 30 days.
    "stream deletes by age": (
        {"group_vars": {"jetstream_streams_declared": [OLD_EVENT_STORE]}},
        "would delete events (max_age",
    ),
    "stream deletes the oldest when full": (
        {"group_vars": {"jetstream_streams_declared": [NEW_EVENT_STORE | {"discard": "old", "max_bytes": "10GB"}]}},
        "with discard old deletes",
    ),
    "stream replicas above the cluster": (
        {"group_vars": {"jetstream_streams_declared": [NEW_EVENT_STORE | {"replicas": 5}]}},
        "replicas 5 is more than",
    ),
    "streams share subjects": (
        {
            "group_vars": {
                "jetstream_streams_declared": [
                    NEW_EVENT_STORE,
                    NEW_EVENT_STORE | {"name": "COMPUTE", "subjects": ["infrastructure.compute.>"]},
                ]
            }
        },
        "overlap in subjects",
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

SSH_WRAPPER = """#!/bin/sh
echo "$@" >> {log}
exec ssh "$@"
"""


def make_inventory(tmp_path: Path, change: dict[str, Any]) -> Path:
    inventory = tmp_path / "inventory"
    shutil.copytree(LAB_INVENTORY, inventory, symlinks=False)
    hosts_file = inventory / "hosts.yml"
    hosts = yaml.safe_load(hosts_file.read_text())
    # No lab-is-up guard: these runs must not depend on the lab (and never reach a host).
    hosts["all"]["vars"].pop("lab_bridge_name")
    members = hosts["all"]["children"]["nats_cluster"]["hosts"]
    for _ in range(change.get("drop_hosts", 0)):
        members.pop(sorted(members)[-1])
    if "add_host" in change:
        members["nats-4"] = change["add_host"]
    hosts_file.write_text(yaml.safe_dump(hosts))
    for host, values in change.get("host_vars", {}).items():
        (inventory / "host_vars").mkdir(exist_ok=True)
        (inventory / "host_vars" / f"{host}.yml").write_text(yaml.safe_dump(values))
    if "group_vars" in change:
        (inventory / "group_vars" / "nats_cluster" / "zz_broken.yml").write_text(yaml.safe_dump(change["group_vars"]))
    return inventory


def recording_ssh(tmp_path: Path) -> tuple[dict[str, str], Path]:
    log = tmp_path / "ssh-calls.log"
    log.touch()
    wrapper = tmp_path / "ssh-recorder"
    wrapper.write_text(SSH_WRAPPER.format(log=log))
    wrapper.chmod(0o755)
    return ansible_env(ANSIBLE_SSH_EXECUTABLE=str(wrapper)), log


@pytest.mark.parametrize("case", sorted(CASES))
def test_site_refuses_broken_inventory_before_touching_hosts(case: str, tmp_path: Path) -> None:
    change, expected = CASES[case]
    inventory = make_inventory(tmp_path, change)
    env, ssh_log = recording_ssh(tmp_path)
    result = run_playbook("site.yml", inventory, env=env, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert expected in output, output
    assert "Preflight |" in output
    assert "Deploy |" not in output, "a deploy play started after a failed preflight"
    assert ssh_log.read_text() == "", "preflight connected to a host"
    for key, value in change.get("group_vars", {}).items():
        if key in SECRET_KEYS and value:
            assert value not in output, f"{key}'s value shows in the output"


def test_the_unbroken_copy_passes_preflight(tmp_path: Path) -> None:
    """Control: the copied lab inventory itself is accepted, so each failure above is its own."""
    inventory = make_inventory(tmp_path, {})
    env, ssh_log = recording_ssh(tmp_path)
    result = run_playbook("preflight.yml", inventory, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ssh_log.read_text() == ""


REFUSING_SSH = """#!/bin/sh
echo "$@" >> {log}
exit 255
"""


@pytest.mark.parametrize(
    "playbook",
    [
        "site.yml",
        "rolling-restart.yml",
        "remediate/remount-storage.yml",
        "remediate/reset-jetstream.yml",
        "remediate/purge-consumers.yml",
    ],
)
def test_a_play_limited_to_part_of_the_cluster_is_refused_before_touching_hosts(playbook: str, tmp_path: Path) -> None:
    """Their health and quorum checks ask every member, so --limit is refused up front. ssh is a
    recorder that connects nowhere, so even a failing guard sends nothing."""
    inventory = make_inventory(tmp_path, {})
    log = tmp_path / "ssh-calls.log"
    log.touch()
    wrapper = tmp_path / "ssh-refuser"
    wrapper.write_text(REFUSING_SSH.format(log=log))
    wrapper.chmod(0o755)
    env = ansible_env(ANSIBLE_SSH_EXECUTABLE=str(wrapper))
    result = run_playbook(playbook, inventory, "--limit", "nats-2", env=env, timeout=120)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0, output[-2000:]
    assert "run it without --limit (left out: nats-1, nats-3)" in output, output[-2000:]
    assert log.read_text() == "", "a limited play connected to a host"
