"""The alert rules on the lab's own Prometheus (roles/nats_monitoring on monitor-1, which site.yml
deploys): nothing fires on the healthy cluster; each lab fault fires an alert naming the node it
hit, and every alert clears once the fault is healed. The time from fault to firing is printed
(the lab scrapes and evaluates every 2 s; the rules wait 30 s before they fire)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from tests.helpers import LAB_INVENTORY, REPO, assert_nothing_lost, nats_lab, run_playbook, wait_healthy
from tests.lab_prometheus import api, query, wait_for
from verify import monitor
from verify.inventory import Cluster
from verify.load import BackgroundPublisher

pytestmark = pytest.mark.lab

TARGET = "nats-3"
# Alerts that name TARGET for each fault (any one of them is the fault seen). cut-routes leaves the
# stalled routes in /routez, so the route count stays; the node loses its meta leader instead.
EXPECTED = {
    "stop": {"NatsNodeDown"},
    "kill": {"NatsNodeDown"},
    "power-loss": {"NatsNodeDown"},
    "isolate": {"NatsNodeDown"},
    "cut-routes": {"NatsServerUnhealthy", "NatsMetaLeaderMissing", "NatsRouteDown"},
    "stale-storage": {"NatsStorageWriteError"},
}
FIRE_WITHIN = 120
CLEAR_WITHIN = 120


def test_prometheus_scrapes_every_node_and_its_certificate_and_nothing_fires(deployed_lab: Cluster) -> None:
    wait_healthy(deployed_lab)
    targets = api("targets")["activeTargets"]
    cluster = deployed_lab.nodes[0]["nats_server_cluster_name"]
    for job in ("nats", "nats_tls"):
        found = {t["labels"]["node"]: t for t in targets if t["labels"]["job"] == job}
        assert sorted(found) == sorted(n.host for n in deployed_lab.nodes), targets
        assert {t["labels"]["cluster"] for t in found.values()} == {cluster}
        assert all(t["health"] == "up" for t in found.values()), found
    # The probe reads the certificate each server has loaded (the earliest end in its chain: the
    # node's, the CA's is later), not a file.
    probed = query('probe_ssl_earliest_cert_expiry{job="nats_tls"}')
    loaded = {
        n.host: datetime.strptime(monitor.get_json(n.monitor_url, "/varz")["tls_cert_not_after"], "%Y-%m-%dT%H:%M:%SZ")
        .replace(tzinfo=UTC)
        .timestamp()
        for n in deployed_lab.nodes
    }
    assert probed == loaded, (probed, loaded)
    assert query('probe_success{job="nats_tls"}') == dict.fromkeys(loaded, 1.0)
    waited, _ = wait_for(lambda now: not now, 60, "a quiet healthy cluster")
    print(f"healthy: no alert firing ({waited:.0f} s after the cluster answered healthy)")


def fire(fault: str) -> tuple[float, list[dict[str, str]]]:
    """Injects FAULT on TARGET and waits for one of its alerts to fire naming TARGET."""
    injected = nats_lab("fault", fault, TARGET)
    assert injected.returncode == 0, injected.stdout + injected.stderr
    fired_after, alerts = wait_for(
        lambda now: any(a["alertname"] in EXPECTED[fault] and a.get("node") == TARGET for a in now),
        FIRE_WITHIN,
        f"{fault} on {TARGET}: one of {sorted(EXPECTED[fault])} for {TARGET}",
    )
    named = sorted({f"{a['alertname']}({a.get('node', '-')})" for a in alerts})
    print(f"{fault} on {TARGET}: fired after {fired_after:.0f} s: {', '.join(named)}")
    return fired_after, alerts


def cleared(deployed_lab: Cluster, fault: str, by: str) -> None:
    wait_healthy(deployed_lab, seconds=120)
    cleared_after, _ = wait_for(lambda now: not now, CLEAR_WITHIN, f"every alert cleared after {by}")
    print(f"{fault}: every alert cleared {cleared_after:.0f} s after {by} left the cluster healthy")


def runbook_playbook(alert: str) -> str:
    """The remediation playbook of the runbook page an alert's annotation names."""
    rules = yaml.safe_load((REPO / "roles/nats_monitoring/files/nats-alerts.rules.yml").read_text())
    (page,) = (r["annotations"]["runbook"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == alert)
    playbook = f"remediate/{Path(page).stem}.yml"
    assert (REPO / "playbooks" / playbook).is_file(), f"{alert} names {page}, which has no {playbook}"
    return playbook


@pytest.mark.parametrize("fault", sorted(set(EXPECTED) - {"stale-storage"}))
def test_each_fault_fires_its_alert_naming_the_node_then_clears_after_heal(deployed_lab: Cluster, fault: str) -> None:
    wait_healthy(deployed_lab)
    wait_for(lambda now: not now, CLEAR_WITHIN, "no alert firing before the fault")
    try:
        fire(fault)
    finally:
        healed = nats_lab("heal", TARGET)
    assert healed.returncode == 0, healed.stdout + healed.stderr
    cleared(deployed_lab, fault, "nats-lab heal")


# A stale store fails only the writes that reach it (/healthz stays ok on an idle node), so the
# CIM's writes go on throughout, as in production: an R3 stream with a replica on TARGET. The
# operator follows the alert's runbook annotation, and that runbook's playbook clears it.
def test_stale_storage_under_writes_fires_and_its_runbook_clears_it_with_nothing_lost(deployed_lab: Cluster) -> None:
    wait_healthy(deployed_lab)
    wait_for(lambda now: not now, CLEAR_WITHIN, "no alert firing before the fault")
    try:
        with BackgroundPublisher(deployed_lab) as publisher:
            time.sleep(1)
            fire("stale-storage")
            playbook = runbook_playbook("NatsStorageWriteError")
            remediated = run_playbook(playbook, LAB_INVENTORY)
            assert remediated.returncode == 0, remediated.stdout[-3000:]
            cleared(deployed_lab, "stale-storage", playbook)
        assert_nothing_lost(publisher)
    finally:
        nats_lab("heal", TARGET)  # the lab's fault record, and the store if the runbook failed
