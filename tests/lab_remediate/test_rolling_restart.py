"""playbooks/rolling-restart.yml on the lab, under continuous R3 publishing: a restart, and a
version change each way between two released versions (2.15.1 and 2.14.6 from the lab mirror),
lose no acked message and fail no publish after client retries; a version change needs an explicit
nats_server_upgrade; an unhealthy cluster and --check are refused or left alone."""

from __future__ import annotations

import json
import time

import pytest

from nats_lab import mirror
from tests.helpers import (
    LAB_INVENTORY,
    NATS_SERVER_VERSION,
    assert_nothing_lost,
    nats_lab,
    run_playbook,
    service_identities,
)
from verify import monitor
from verify.inventory import Cluster
from verify.load import BackgroundPublisher

pytestmark = pytest.mark.lab

PLAYBOOK = "rolling-restart.yml"
CURRENT, OTHER = NATS_SERVER_VERSION, mirror.OTHER_VERSION


def versions(cluster: Cluster) -> dict[str, str]:
    return {n.host: monitor.get_json(n.monitor_url, "/varz")["version"] for n in cluster.nodes}


def restart_order(json_stdout: str) -> list[str]:
    """Hosts in the order their restart task changed them."""
    order = []
    for play in json.loads(json_stdout)["plays"]:
        for task in play["tasks"]:
            if "Rolling | restart (lame duck" in task["task"]["name"]:
                order += [host for host, result in task["hosts"].items() if result.get("changed")]
    return order


def roll_under_load(cluster: Cluster, *extra: str) -> tuple[BackgroundPublisher, float]:
    with BackgroundPublisher(cluster) as publisher:
        time.sleep(1)
        started = time.monotonic()
        result = run_playbook(PLAYBOOK, LAB_INVENTORY, *extra, json_output=True, timeout=900)
        elapsed = time.monotonic() - started
        time.sleep(1)
    assert result.returncode == 0, result.stdout[-4000:]
    assert restart_order(result.stdout) == ["nats-1", "nats-2", "nats-3"]
    return publisher, elapsed


def report(what: str, publisher: BackgroundPublisher, elapsed: float) -> None:
    tally = publisher.tally
    print(
        f"{what}: {elapsed:.1f} s; published {tally.attempted}, acked {len(tally.acked)}, "
        f"failed {len(tally.failed)}, client retries {tally.retries} {tally.errors}"
    )


def test_refuses_to_start_on_an_unhealthy_cluster(healthy_lab: Cluster) -> None:
    assert nats_lab("fault", "stop", "nats-3").returncode == 0
    before = service_identities(healthy_lab)
    result = run_playbook(PLAYBOOK, LAB_INVENTORY)
    assert result.returncode != 0
    output = " ".join(result.stdout.split())
    assert "nats-3 is not healthy" in output, output[-3000:]
    assert service_identities(healthy_lab) == before


def test_check_mode_restarts_nothing(healthy_lab: Cluster) -> None:
    before = service_identities(healthy_lab)
    result = run_playbook(PLAYBOOK, LAB_INVENTORY, "--check")
    assert result.returncode == 0, result.stdout[-3000:]
    assert service_identities(healthy_lab) == before


def test_restart_under_load_loses_nothing(healthy_lab: Cluster) -> None:
    before = service_identities(healthy_lab)
    publisher, elapsed = roll_under_load(healthy_lab)
    after = service_identities(healthy_lab)
    assert all(after[host] != before[host] for host in before), (before, after)
    assert_nothing_lost(publisher)
    report("rolling restart", publisher, elapsed)


def test_version_change_needs_to_be_asked_for(healthy_lab: Cluster) -> None:
    before = service_identities(healthy_lab)
    result = run_playbook(PLAYBOOK, LAB_INVENTORY, "-e", f"nats_server_version={OTHER}")
    assert result.returncode != 0
    assert "nats_server_upgrade=true" in " ".join(result.stdout.split()), result.stdout[-3000:]
    assert service_identities(healthy_lab) == before and set(versions(healthy_lab).values()) == {CURRENT}


def test_version_change_each_way_under_load_loses_nothing(healthy_lab: Cluster) -> None:
    for target, extra in ((OTHER, ["-e", f"nats_server_version={OTHER}"]), (CURRENT, [])):
        publisher, elapsed = roll_under_load(healthy_lab, *extra, "-e", "nats_server_upgrade=true")
        assert set(versions(healthy_lab).values()) == {target}
        assert_nothing_lost(publisher)
        report(f"rolling version change to {target}", publisher, elapsed)
