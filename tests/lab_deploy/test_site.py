"""playbooks/site.yml on the real lab: a healthy cluster, idempotent, safe changes, refusals.

The tests run in file order and each leaves the cluster converged and healthy for the next.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.helpers import (
    LAB_INVENTORY,
    NATS_SERVER_VERSION,
    REPO,
    assert_nothing_lost,
    nats_lab,
    on,
    recap,
    run_playbook,
    service_identity,
    wait_healthy,
)
from verify import monitor
from verify.inventory import Cluster, Node
from verify.load import BackgroundPublisher

pytestmark = pytest.mark.lab


def test_every_node_is_healthy_and_routed_to_both_peers(deployed_lab: Cluster) -> None:
    names = {n.server_name for n in deployed_lab.nodes}
    for node in deployed_lab.nodes:
        health = monitor.healthz(node.monitor_url)
        assert health.status == 200, f"{node.host}: {health.body}"
        routes = monitor.get_json(node.monitor_url, "/routez")["routes"]
        assert {r["remote_name"] for r in routes} == names - {node.server_name}, node.host
        varz = monitor.get_json(node.monitor_url, "/varz")
        assert varz["cluster"]["name"] == "phx-cluster"
        assert varz["version"] == deployed_lab.setting("nats_server_version")


def test_meta_group_has_a_leader_and_three_members_in_domain(deployed_lab: Cluster) -> None:
    leaders = set()
    for node in deployed_lab.nodes:
        jsz = monitor.get_json(node.monitor_url, "/jsz")
        assert jsz["config"]["domain"] == "dgx-phx"
        assert jsz["meta_cluster"]["cluster_size"] == 3
        leaders.add(jsz["meta_cluster"].get("leader"))
    assert len(leaders) == 1 and None not in leaders and leaders <= {n.server_name for n in deployed_lab.nodes}


def test_store_dir_is_on_the_mounted_share(deployed_lab: Cluster) -> None:
    for node in deployed_lab.nodes:
        store_dir = node["nats_server_jetstream_store_dir"]
        jsz = monitor.get_json(node.monitor_url, "/jsz")
        assert jsz["config"]["store_dir"] == f"{store_dir}/jetstream"
        target, fstype = on(node.host, f"findmnt -n -o TARGET,FSTYPE -T {store_dir}").split()
        assert target == node["jetstream_storage_mount_path"]
        assert fstype in {node["jetstream_storage_mount_fstype"], "fuse." + node["jetstream_storage_mount_fstype"]}
        assert on(node.host, f"cat {node['nats_server_jetstream_store_marker']}").strip() == node.host


def test_second_run_changes_nothing(deployed_lab: Cluster) -> None:
    result = run_playbook("site.yml", LAB_INVENTORY)
    assert result.returncode == 0, result.stdout[-4000:]
    counts = recap(result.stdout)
    # site.yml ends on the monitoring host: it converges too.
    assert set(counts) == {"nats-1", "nats-2", "nats-3", "monitor-1"}
    assert all(c["changed"] == 0 and c["failed"] == 0 for c in counts.values()), counts


def test_check_diff_on_the_converged_cluster_reports_no_change(deployed_lab: Cluster) -> None:
    result = run_playbook("site.yml", LAB_INVENTORY, "--check", "--diff")
    assert result.returncode == 0, result.stdout[-4000:]
    counts = recap(result.stdout)
    assert all(c["changed"] == 0 for c in counts.values()), counts


def _max_memory(cluster: Cluster) -> dict[str, int]:
    return {
        n.host: monitor.get_json(n.monitor_url, "/varz")["jetstream"]["config"]["max_memory"] for n in cluster.nodes
    }


def rolling_batches(json_stdout: str) -> list[dict[str, list[str]]]:
    """For each batch of the rolling play: {host: [names of its tasks that changed]}."""
    plays = json.loads(json_stdout)["plays"]
    batches = []
    for play in plays:
        if not play["play"]["name"].startswith("Deploy | roll changes"):
            continue
        changed: dict[str, list[str]] = {}
        for task in play["tasks"]:
            for host, result in task["hosts"].items():
                if result.get("changed"):
                    changed.setdefault(host, []).append(task["task"]["name"])
        batches.append(changed)
    return batches


def apply_under_load(cluster: Cluster, *extra: str) -> tuple[list[dict[str, list[str]]], BackgroundPublisher]:
    with BackgroundPublisher(cluster) as publisher:
        time.sleep(1)
        result = run_playbook("site.yml", LAB_INVENTORY, *extra, json_output=True)
        time.sleep(1)
    assert result.returncode == 0, result.stdout[-4000:]
    return rolling_batches(result.stdout), publisher


def test_reloadable_change_rolls_one_node_at_a_time_under_load(deployed_lab: Cluster) -> None:
    """Raising max_memory_store: NATS reloads it, so each node is reloaded in turn, none restarted."""
    before = _max_memory(deployed_lab)
    batches, publisher = apply_under_load(deployed_lab, "-e", "nats_server_jetstream_max_memory_store=1536MB")
    assert set(_max_memory(deployed_lab).values()) == {1536 * 1024 * 1024}, before
    assert [sorted(b) for b in batches] == [["nats-1"], ["nats-2"], ["nats-3"]], batches
    for batch in batches:
        (tasks,) = batch.values()
        assert any("reload the config" in t for t in tasks), tasks
        assert not any("restart" in t for t in tasks), tasks
    assert_nothing_lost(publisher)


def test_change_nats_cannot_reload_restarts_one_node_at_a_time_under_load(deployed_lab: Cluster) -> None:
    """Back to the inventory's 1GB: NATS refuses to reload a decrease, so each node restarts in turn."""
    batches, publisher = apply_under_load(deployed_lab)
    assert set(_max_memory(deployed_lab).values()) == {1024 * 1024 * 1024}
    assert [sorted(b) for b in batches] == [["nats-1"], ["nats-2"], ["nats-3"]], batches
    for batch in batches:
        (tasks,) = batch.values()
        assert any("restart (lame duck" in t for t in tasks), tasks
    assert_nothing_lost(publisher)


def test_config_that_fails_the_checker_changes_nothing(deployed_lab: Cluster) -> None:
    before = {
        n.host: (on(n.host, "sha256sum /etc/nats-server/nats-server.conf"), service_identity(n.host))
        for n in deployed_lab.nodes
    }
    # Passes preflight (the banner is free text) but renders a file nats-server -t refuses.
    broken = json.dumps({"nats_server_managed_banner": "x\ncluster { routes: [ }"})
    result = run_playbook("site.yml", LAB_INVENTORY, "-e", broken)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Configure | render nats-server.conf" in output
    assert "failed to validate" in output
    after = {
        n.host: (on(n.host, "sha256sum /etc/nats-server/nats-server.conf"), service_identity(n.host))
        for n in deployed_lab.nodes
    }
    assert after == before
    wait_healthy(deployed_lab, 10)


def release_source(cluster: Cluster, source: str, tree: str = "") -> list[str]:
    """Extra vars that point the role at the lab mirror (url) or its files on the controller."""
    if source == "url":
        return ["-e", f"nats_server_release_base_url={cluster.nodes[0]['nats_server_release_base_url']}{tree}"]
    return [
        "-e",
        "nats_server_artifact_source=controller",
        "-e",
        f"nats_server_controller_release_dir={REPO}/.lab/mirror{tree}",
    ]


@pytest.mark.parametrize("source", ["url", "controller"])
def test_tampered_release_is_refused_and_nothing_changes(deployed_lab: Cluster, source: str) -> None:
    def state(node: Node) -> tuple[str, str, str]:
        # The controller source stages its copies in their own directory: that is allowed to appear.
        return (
            on(node.host, "readlink /usr/local/sbin/nats-server"),
            service_identity(node.host),
            on(node.host, "ls /opt/nats-server /var/cache/nats-server | grep -vx controller"),
        )

    before = {n.host: state(n) for n in deployed_lab.nodes}
    result = run_playbook(
        "site.yml",
        LAB_INVENTORY,
        *release_source(deployed_lab, source, "/tampered"),
        "-e",
        "nats_server_version=2.14.6",
        "-e",
        "nats_server_upgrade=true",
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    if source == "url":
        assert "download the release archive and verify its checksum" in output
        assert "did not match" in output, output[-3000:]
    else:
        assert "does not match its SHA256SUMS" in output and "refusing it" in output, output[-3000:]
    assert all(c["changed"] == 0 for c in recap(result.stdout).values()), recap(result.stdout)
    after = {n.host: state(n) for n in deployed_lab.nodes}
    assert after == before
    assert all(
        on(n.host, "test -e /opt/nats-server/2.14.6 && echo yes || echo no").strip() == "no" for n in deployed_lab.nodes
    )


def test_release_from_the_controller_converges_without_restarts(deployed_lab: Cluster) -> None:
    before = {n.host: service_identity(n.host) for n in deployed_lab.nodes}
    result = run_playbook("site.yml", LAB_INVENTORY, *release_source(deployed_lab, "controller"))
    assert result.returncode == 0, result.stdout[-4000:]
    assert {n.host: service_identity(n.host) for n in deployed_lab.nodes} == before
    for node in deployed_lab.nodes:
        sums = on(node.host, "cat /var/cache/nats-server/controller/SHA256SUMS")
        assert f"nats-server-v{NATS_SERVER_VERSION}-linux-amd64.tar.gz" in sums


def test_server_refuses_to_start_without_its_storage_mount(deployed_lab: Cluster) -> None:
    node = deployed_lab.nodes[-1]
    mount_path = node["jetstream_storage_mount_path"]
    source = node["jetstream_storage_mount_source"]
    try:
        on(node.host, "systemctl stop nats-server")
        # The share cannot be mounted (as when the NFS server is away): point fstab at nothing.
        on(
            node.host,
            f"umount {mount_path} && sed -i 's#{source}#{source}-gone#' /etc/fstab && systemctl daemon-reload",
        )
        started = nats_lab("ssh", node.host, "--", "systemctl start nats-server", timeout=60)
        assert started.returncode != 0, "nats-server started without its storage"
        assert on(node.host, "systemctl is-active nats-server || true").strip() in {"inactive", "failed"}
        assert on(node.host, f"ls -A {mount_path} | wc -l").strip() == "0", (
            "something was written under the bare mount point"
        )
        assert on(node.host, f"findmnt -n {mount_path} || echo none").strip() == "none"
    finally:
        on(node.host, f"sed -i 's#{source}-gone#{source}#' /etc/fstab && systemctl daemon-reload")
        on(node.host, "systemctl reset-failed nats-server; systemctl start nats-server")
    wait_healthy(deployed_lab, 60)
    assert on(node.host, f"findmnt -n -o TARGET {mount_path}").strip() == mount_path
