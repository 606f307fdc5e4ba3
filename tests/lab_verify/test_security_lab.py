"""The security checks against the real lab: what they must refuse is refused for real, a leaked
secret is found (and not repeated), and a certificate rotated through the deploy is taken by
reload, without a restart, and warned about when it nears its end."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from tests.helpers import (
    LAB_INVENTORY,
    failed_checks,
    issue_certificates,
    nats_verify,
    on,
    recap,
    run_playbook,
    service_identities,
    wait_healthy,
)
from tests.lab_prometheus import wait_for
from verify import monitor
from verify.client import connect_tls_or_nothing
from verify.inventory import Cluster

pytestmark = pytest.mark.lab

EXPIRY_ALERT = "NatsCertificateExpiringSoon"


def test_a_leaked_secret_in_a_log_is_found_and_not_repeated(deployed_lab: Cluster, tmp_path: Path) -> None:
    """The deploy-log check can fail: a log with the application password in it."""
    key = (LAB_INVENTORY.parent.parent / ".lab" / "pki" / "nats-2.key").read_text()
    leaky = tmp_path / "leaky.log"
    leaky.write_text(
        f"TASK [x] ok: [nats-1] => {{'password': '{deployed_lab.admin.password}'}}\n"
        # A key as a YAML callback shows a multi-line value: indented.
        + "    content: |-\n"
        + "".join(f"        {line}\n" for line in key.splitlines())
    )
    code, report, _, output = nats_verify(tmp_path, "-m", "security", "--deploy-log", str(leaky))
    assert code != 0, output[-2000:]
    symptom = failed_checks(report)["test_deploy_log_holds_no_secret"]
    assert "nats_server_app_admin_password" in symptom and "nats-2 private key" in symptom, symptom
    assert "nats-1 private key" not in symptom, symptom
    assert deployed_lab.admin.password not in output + json.dumps(report)


def test_the_system_user_sees_every_server_and_the_app_user_does_not(deployed_lab: Cluster) -> None:
    """Accounts separate: the application user's ping to $SYS reaches no server."""

    async def ping(login: dict[str, object]) -> set[str]:
        nc = await connect_tls_or_nothing(deployed_lab.client_urls, connect_timeout=3, **login)
        names: set[str] = set()

        async def collect(message: Msg) -> None:
            names.add(json.loads(message.data)["server"]["name"])

        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=collect)
        await nc.publish("$SYS.REQ.SERVER.PING", b"", reply=inbox)
        await asyncio.sleep(1)
        await nc.close()
        return names

    assert asyncio.run(ping(deployed_lab.login(deployed_lab.system))) == {"nats-1", "nats-2", "nats-3"}
    assert asyncio.run(ping(deployed_lab.login())) == set()
    assert asyncio.run(ping(deployed_lab.login(deployed_lab.clients["cim"]))) == set()


def test_the_cim_user_cannot_destroy_the_event_store(deployed_lab: Cluster) -> None:
    """For real, as the CIM's user: its appends are stored, and its stream delete, purge and
    message delete (empty requests, exactly as a client sends them) are refused by permission;
    the administrator then finds every event still there."""
    stream = "INFRASTRUCTURE_EVENTS"

    async def attempt() -> tuple[list[str], list[int], int]:
        violations: list[str] = []

        async def note(error: Exception) -> None:
            violations.append(str(error))

        cim = deployed_lab.login(deployed_lab.clients["cim"])
        nc = await connect_tls_or_nothing(deployed_lab.client_urls, connect_timeout=3, error_cb=note, **cim)
        js = nc.jetstream(timeout=3)
        seqs = [(await js.publish(f"infrastructure.compute.{n}.created", b"{}")).seq for n in range(5)]
        for subject, body in (
            (f"$JS.API.STREAM.DELETE.{stream}", b""),
            (f"$JS.API.STREAM.PURGE.{stream}", b""),
            (f"$JS.API.STREAM.MSG.DELETE.{stream}", json.dumps({"seq": seqs[0]}).encode()),
        ):
            with pytest.raises(nats.errors.TimeoutError):
                await nc.request(subject, body, timeout=1)
        await nc.close()
        admin = await connect_tls_or_nothing(deployed_lab.client_urls, connect_timeout=3, **deployed_lab.login())
        info = await admin.jetstream(timeout=3).stream_info(stream)
        first = (await admin.jetstream(timeout=3).get_msg(stream, seqs[0])).seq or 0
        await admin.close()
        return violations, [first], info.state.messages

    violations, (first,), messages = asyncio.run(attempt())
    for verb in ("DELETE", "PURGE", "MSG.DELETE"):
        assert any(f"stream.{verb.lower()}.{stream.lower()}" in v.lower() for v in violations), violations
    assert messages >= 5 and first > 0


def test_a_client_trusting_another_ca_is_refused_by_its_own_check(deployed_lab: Cluster) -> None:
    """The servers' certificates chain to the lab CA only: a client trusting just the system CAs
    rejects them (a stand-in for a man in the middle with someone else's certificate)."""

    async def attempt() -> str:
        try:
            nc = await connect_tls_or_nothing(
                deployed_lab.client_urls,
                connect_timeout=3,
                allow_reconnect=False,
                user=deployed_lab.admin.user,
                password=deployed_lab.admin.password,
                tls=ssl.create_default_context(),
            )
        except Exception as error:
            return f"{type(error).__name__}: {error}"
        await nc.close()
        return ""

    assert "CERTIFICATE_VERIFY_FAILED" in asyncio.run(attempt())


def test_a_client_given_one_address_fails_over_to_the_members_it_learns(deployed_lab: Cluster) -> None:
    """As the CIM's tools connect (one --server): that server stops, and the client carries on
    through a member it learned from it, over TLS checked against the address it was given."""
    known = deployed_lab.node("nats-2")

    async def fail_over() -> str:
        reconnected = asyncio.Event()

        async def on_reconnect() -> None:
            reconnected.set()

        nc = await connect_tls_or_nothing(
            [known.client_url],
            connect_timeout=3,
            reconnect_time_wait=0.5,
            max_reconnect_attempts=30,
            reconnected_cb=on_reconnect,
            **deployed_lab.login(),
        )
        try:
            learned = {s.hostname for s in nc.servers} - {known.address}
            assert len(learned) == len(deployed_lab.nodes) - 1, f"learned only {learned}"
            await asyncio.to_thread(on, known.host, "systemctl stop nats-server")
            await asyncio.wait_for(reconnected.wait(), 30)
            assert nc.connected_url is not None and nc.connected_url.hostname != known.address
            await nc.jetstream(timeout=5).account_info()
            return str(nc.connected_url.hostname)
        finally:
            await nc.close()

    try:
        now_on = asyncio.run(fail_over())
    finally:
        on(known.host, "systemctl start nats-server")
    wait_healthy(deployed_lab)
    print(f"a client given only {known.address} failed over to {now_on}")


def _loaded_not_after(cluster: Cluster) -> dict[str, str]:
    return {n.host: monitor.get_json(n.monitor_url, "/varz")["tls_cert_not_after"] for n in cluster.nodes}


@pytest.fixture
def short_lived_certificates(deployed_lab: Cluster) -> Iterator[Cluster]:
    """Every node's certificate reissued for 10 days (a renewal window longer than a year forces
    it); afterwards reissued for the default year and deployed again."""
    issue_certificates("-e", "nats_pki_valid_days=10", "-e", "nats_pki_renew_within_days=400")
    yield deployed_lab
    issue_certificates()  # the 10-day certificates are inside the default 30-day window: a year again
    result = run_playbook("site.yml", LAB_INVENTORY, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    wait_healthy(deployed_lab)
    assert all(
        (datetime.strptime(v, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) - datetime.now(UTC)).days > 300
        for v in _loaded_not_after(deployed_lab).values()
    )
    wait_for(lambda now: all(a["alertname"] != EXPIRY_ALERT for a in now), 120, f"{EXPIRY_ALERT} cleared")


def test_rotated_certificates_are_reloaded_without_restart_and_warned_near_expiry(
    short_lived_certificates: Cluster, tmp_path: Path
) -> None:
    cluster = short_lived_certificates
    wait_healthy(cluster)
    before = _loaded_not_after(cluster)
    started = service_identities(cluster)
    # site.yml would renew certificates this close to expiry itself: not this time.
    result = run_playbook("site.yml", LAB_INVENTORY, "-e", "nats_pki_renew_within_days=5", timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    after = _loaded_not_after(cluster)
    assert all(after[h] != before[h] for h in after), f"not reloaded: {before} -> {after}"
    for value in after.values():
        days = (datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) - datetime.now(UTC)).days
        assert 8 <= days <= 10, after
    assert service_identities(cluster) == started, "a certificate change restarted a server"
    assert all(counts["failed"] == 0 for counts in recap(result.stdout).values())
    # verify passes, and warns about each node's short-lived certificates.
    wait_healthy(cluster)
    code, report, _, output = nats_verify(tmp_path, "-m", "security")
    assert code == 0, output[-3000:]
    warned = {w.split(":")[0] for w in report["warnings"] if "certificate expires in" in w}
    assert warned == {"nats-1", "nats-2", "nats-3"}, report["warnings"]
    assert "WARNING nats-1: the client certificate expires in" in output
    # Prometheus's certificate probe sees the loaded certificates and alerts on every node.
    nodes = {n.host for n in cluster.nodes}
    fired_after, _ = wait_for(
        lambda now: {a.get("node") for a in now if a["alertname"] == EXPIRY_ALERT} == nodes,
        120,
        f"{EXPIRY_ALERT} on {sorted(nodes)}",
    )
    print(f"{EXPIRY_ALERT} fired for every node {fired_after:.0f} s after site.yml loaded 10-day certificates")
