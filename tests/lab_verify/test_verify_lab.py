"""nats-verify against the real lab: green on a healthy cluster; for each lab fault the right
checks fail, naming the right node, well inside 30 s; green again after heal."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.js.api import StorageType, StreamConfig

from tests.helpers import failed_checks, nats_lab, nats_verify, verify_until_green, wait_healthy
from verify import monitor
from verify.client import connect_tls_or_nothing
from verify.inventory import Cluster

pytestmark = pytest.mark.lab

TARGET = "nats-2"
ROUTE_CHECK = "test_messages_cross_every_route"
# Checks that must fail for each fault, all about TARGET (name fragments of the check ids).
EXPECTED_FAILURES = {
    "stop": {
        f"test_service_active_and_enabled[{TARGET}]",
        f"test_full_healthz[{TARGET}]",
        f"test_ports_listening[{TARGET}]",
    },
    "kill": {f"test_service_active_and_enabled[{TARGET}]", f"test_full_healthz[{TARGET}]"},
    "isolate": {f"test_service_active_and_enabled[{TARGET}]", f"test_full_healthz[{TARGET}]"},
    # Only the route port: /routez still lists the stalled routes, SSH and clients still work.
    "cut-routes": {ROUTE_CHECK},
    "stale-storage": {f"test_storage_answers_stat_and_write_probe[{TARGET}]"},
}
# After a network fault heals, TCP waits out its retransmission backoff before a stalled route
# carries again, and stream leaders are re-elected: verify may fail for a while (each failure is
# printed) and must be green within this. After the other faults the first run must be green.
NETWORK_FAULTS = {"isolate", "cut-routes"}
CONVERGE_SECONDS = 90
SYMPTOMS = {
    "stop": "nats-server is not running",
    "kill": "unreachable over SSH",
    "isolate": "unreachable over SSH",
    "cut-routes": f"-> {TARGET}: no reply",
    "stale-storage": "Stale file handle",
}


def test_verify_passes_on_the_healthy_cluster(deployed_lab: Cluster, deploy_log: Path, tmp_path: Path) -> None:
    """Every check, the security ones included: the session's own -vvv deploy holds no secret."""
    wait_healthy(deployed_lab)
    code, report, elapsed, output = nats_verify(tmp_path, "--deploy-log", str(deploy_log))
    assert code == 0, output[-3000:]
    assert report["failed"] == 0 and report["passed"] >= 50, report
    groups = {c["group"] for c in report["checks"]}
    assert groups == {"host", "cluster", "security", "eventstore"}
    outcomes = {c["nodeid"].split("::")[-1]: c["outcome"] for c in report["checks"]}
    assert outcomes["test_deploy_log_holds_no_secret"] == "passed"
    # It was a -vvv log (SSH connection lines appear from -vvv on) of a run that changed things.
    log = deploy_log.read_text()
    assert "ESTABLISH SSH CONNECTION" in log and "changed=" in log
    assert "nats-verify summary" in output
    print(f"verify on a healthy lab: {elapsed:.1f} s wall, {report['passed']} checks")


def test_verify_leaves_no_probe_stream_or_consumer(deployed_lab: Cluster, tmp_path: Path) -> None:
    nats_verify(tmp_path)
    jsz = monitor.get_json(deployed_lab.nodes[0].monitor_url, "/jsz?accounts=true&streams=true")
    streams = [s["name"] for a in jsz.get("account_details") or [] for s in a.get("stream_detail") or []]
    assert not [s for s in streams if s.startswith("VERIFY_PROBE_")], streams


def test_verify_selects_groups_by_marker(deployed_lab: Cluster, tmp_path: Path) -> None:
    code, report, _, output = nats_verify(tmp_path, "-m", "host")
    assert code == 0, output[-2000:]
    assert {c["group"] for c in report["checks"]} == {"host"}


@pytest.fixture(scope="module")
def r3_stream(deployed_lab: Cluster) -> Iterator[str]:
    """An R3 stream with data, so the stream report has replicas to judge."""
    name = "LAB_VERIFY_R3"

    async def create() -> None:
        nc = await connect_tls_or_nothing(deployed_lab.client_urls, connect_timeout=3, **deployed_lab.login())
        js = nc.jetstream(timeout=5)
        await js.add_stream(StreamConfig(name=name, subjects=["labverify.>"], storage=StorageType.FILE, num_replicas=3))
        await js.publish("labverify.x", b"1")
        await nc.close()

    async def remove() -> None:
        nc = await connect_tls_or_nothing(deployed_lab.client_urls, connect_timeout=3, **deployed_lab.login())
        await nc.jetstream(timeout=5).delete_stream(name)
        await nc.close()

    asyncio.run(create())
    yield name
    wait_healthy(deployed_lab)
    asyncio.run(remove())


@pytest.mark.parametrize("fault", ["stop", "kill", "isolate", "cut-routes", "stale-storage"])
def test_fault_is_named_within_30_seconds_and_heals(
    deployed_lab: Cluster, r3_stream: str, tmp_path: Path, fault: str
) -> None:
    wait_healthy(deployed_lab)
    injected = nats_lab("fault", fault, TARGET)
    assert injected.returncode == 0, injected.stdout + injected.stderr
    try:
        code, report, elapsed, output = nats_verify(tmp_path)
    finally:
        healed = nats_lab("heal", TARGET)
    assert healed.returncode == 0, healed.stdout + healed.stderr
    assert code != 0, f"verify passed with {fault} on {TARGET}"
    assert elapsed < 30, f"verify took {elapsed:.1f} s with {fault} on {TARGET}"
    failures = failed_checks(report)
    assert EXPECTED_FAILURES[fault] <= set(failures), f"{fault}: failed checks were {sorted(failures)}"
    for check in EXPECTED_FAILURES[fault]:
        assert TARGET in failures[check], failures[check]
    assert any(SYMPTOMS[fault] in symptom for symptom in failures.values()), failures
    if fault == "isolate":
        # One timeout for the silent address, then its other ports are not waited on again.
        assert any("not tried" in symptom for symptom in failures.values()), failures
    if fault == "cut-routes":
        pairs = re.findall(r"(nats-\d) -> (nats-\d)", failures[ROUTE_CHECK])
        assert pairs and all(TARGET in pair for pair in pairs), failures[ROUTE_CHECK]
        # The hosts themselves are fine: only traffic between them shows the cut.
        assert not [c for c in report["checks"] if c["group"] == "host" and c["outcome"] == "failed"], failures
    # Host checks of the other nodes stay green: the failure is pinned on the right node.
    host_failures_elsewhere = [
        c for c in report["checks"] if c["group"] == "host" and c["node"] != TARGET and c["outcome"] == "failed"
    ]
    assert not host_failures_elsewhere, host_failures_elsewhere
    print(f"{fault} on {TARGET}: verify failed in {elapsed:.1f} s with {len(failures)} failing checks")
    wait_healthy(deployed_lab)
    code, report, output, waited = verify_until_green(tmp_path, CONVERGE_SECONDS if fault in NETWORK_FAULTS else 0)
    assert code == 0, f"still failing after heal of {fault}:\n{output[-3000:]}"
    print(f"{fault}: verify green {waited:.1f} s after the cluster answered healthy")
