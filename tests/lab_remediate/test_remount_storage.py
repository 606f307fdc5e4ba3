"""playbooks/remediate/remount-storage.yml on the lab: a stale NFS handle injected under an R3
publishing load is found by verify, then by the runbook, and fixed one node at a time with
nothing lost; a healthy cluster and --check change nothing; acting without quorum is refused."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.helpers import (
    LAB_INVENTORY,
    assert_nothing_lost,
    failed_checks,
    nats_lab,
    nats_verify,
    on,
    recap,
    run_playbook,
    service_identities,
    service_identity,
)
from verify.inventory import Cluster
from verify.load import BackgroundPublisher

pytestmark = pytest.mark.lab

PLAYBOOK = "remediate/remount-storage.yml"
TARGET = "nats-2"
STORE = f"/mnt/cimstor-jetstream/{TARGET}"


def storage_is_stale(host: str) -> bool:
    result = nats_lab("ssh", host, "--", f"timeout 5 stat {STORE}")
    return "Stale file handle" in result.stdout + result.stderr


def inject_stale_storage(host: str) -> None:
    result = nats_lab("fault", "stale-storage", host)
    assert result.returncode == 0, result.stderr
    assert storage_is_stale(host)


def test_healthy_cluster_is_left_alone(healthy_lab: Cluster) -> None:
    before = service_identities(healthy_lab)
    result = run_playbook(PLAYBOOK, LAB_INVENTORY)
    assert result.returncode == 0, result.stdout[-3000:]
    assert {host: counts["changed"] for host, counts in recap(result.stdout).items()} == dict.fromkeys(before, 0)
    assert "ok, left alone" in result.stdout
    assert service_identities(healthy_lab) == before


def test_check_mode_on_stale_storage_changes_nothing(healthy_lab: Cluster) -> None:
    before = service_identity(TARGET)
    inject_stale_storage(TARGET)
    result = run_playbook(PLAYBOOK, LAB_INVENTORY, "--check")
    assert result.returncode == 0, result.stdout[-3000:]
    output = " ".join(result.stdout.split())
    assert "stale, remounting: probe: stat: cannot statx" in output and "Stale file handle" in output, output[-3000:]
    assert storage_is_stale(TARGET), "--check replaced the mount"
    assert service_identity(TARGET) == before, "--check restarted nats-server"


def test_refuses_when_the_other_nodes_cannot_hold_quorum(healthy_lab: Cluster) -> None:
    before = service_identity(TARGET)
    inject_stale_storage(TARGET)
    assert nats_lab("fault", "stop", "nats-3").returncode == 0
    result = run_playbook(PLAYBOOK, LAB_INVENTORY)
    assert result.returncode != 0
    output = " ".join(result.stdout.split())
    # nats-1 may be listed too: with nats-2 stale and nats-3 stopped its R3 replicas lose quorum.
    assert f"Refusing to take {TARGET} down" in output, output[-3000:]
    assert re.search(r"unhealthy: [^;]*nats-3", output), output[-3000:]
    assert storage_is_stale(TARGET) and service_identity(TARGET) == before, "it acted after refusing"


def test_stale_storage_under_load_is_found_and_remounted_with_nothing_lost(
    healthy_lab: Cluster, tmp_path: Path
) -> None:
    with BackgroundPublisher(healthy_lab) as publisher:
        time.sleep(1)
        inject_stale_storage(TARGET)
        code, report, _, output = nats_verify(tmp_path, "-m", "host")
        assert code != 0, output[-2000:]
        failures = failed_checks(report)
        assert f"test_storage_answers_stat_and_write_probe[{TARGET}]" in failures, failures
        assert all(TARGET in check for check in failures), failures
        hints = {c["runbook"] for c in report["checks"] if c["outcome"] == "failed"}
        assert any("playbooks/remediate/remount-storage.yml" in hint for hint in hints), hints

        started = time.monotonic()
        result = run_playbook(PLAYBOOK, LAB_INVENTORY)
        elapsed = time.monotonic() - started
        time.sleep(1)
    assert result.returncode == 0, result.stdout[-4000:]
    changed = {host: counts["changed"] for host, counts in recap(result.stdout).items()}
    assert changed[TARGET] > 0 and changed["nats-1"] == changed["nats-3"] == 0, changed
    assert not storage_is_stale(TARGET)
    runbook_time = re.search(r"Remount storage: done in ([\d.]+) s", result.stdout)
    assert runbook_time, result.stdout[-2000:]

    code, report, _, output = nats_verify(tmp_path)
    assert code == 0, output[-3000:]
    assert_nothing_lost(publisher)
    tally = publisher.tally
    print(
        f"remount-storage: healthy {runbook_time.group(1)} s after the playbook started ({elapsed:.1f} s wall); "
        f"published {tally.attempted}, acked {len(tally.acked)}, failed {len(tally.failed)}, retries {tally.retries}"
    )
    assert on(TARGET, f"findmnt -n -o FSTYPE {STORE.rsplit('/', 1)[0]}").strip() == "fuse.cimnfs"


def test_named_nodes_are_remounted_and_unknown_names_refused(healthy_lab: Cluster) -> None:
    before = service_identities(healthy_lab)
    refused = run_playbook(PLAYBOOK, LAB_INVENTORY, "-e", "remount_storage_nodes=nats-3,nats-7")
    assert refused.returncode != 0
    assert "remount_storage_nodes names nats-7, not members" in " ".join(refused.stdout.split())
    result = run_playbook(PLAYBOOK, LAB_INVENTORY, "-e", "remount_storage_nodes=nats-3")
    assert result.returncode == 0, result.stdout[-3000:]
    changed = {host: counts["changed"] for host, counts in recap(result.stdout).items()}
    assert changed["nats-3"] > 0 and changed["nats-1"] == changed["nats-2"] == 0, changed
    after = service_identities(healthy_lab)
    assert after["nats-3"] != before["nats-3"] and {h: after[h] for h in ("nats-1", "nats-2")} == {
        h: before[h] for h in ("nats-1", "nats-2")
    }


def test_every_node_stale_needs_all_at_once_then_recovers(healthy_lab: Cluster, tmp_path: Path) -> None:
    hosts = [node.host for node in healthy_lab.nodes]
    before = service_identities(healthy_lab)
    for host in hosts:
        assert nats_lab("fault", "stale-storage", host).returncode == 0
    refused = run_playbook(PLAYBOOK, LAB_INVENTORY)
    assert refused.returncode != 0
    assert "stale on every node" in " ".join(refused.stdout.split()), refused.stdout[-3000:]
    assert all(storage_is_stale(host) for host in hosts)
    assert service_identities(healthy_lab) == before

    result = run_playbook(PLAYBOOK, LAB_INVENTORY, "-e", "remount_storage_all_at_once=true")
    assert result.returncode == 0, result.stdout[-4000:]
    assert not any(storage_is_stale(host) for host in hosts)
    code, _, _, output = nats_verify(tmp_path)
    assert code == 0, output[-3000:]
