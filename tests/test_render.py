"""The config template renders configs nats-server itself accepts, whose routes name every peer."""

from __future__ import annotations

import ipaddress
import re
import subprocess
from pathlib import Path

import bcrypt
import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings

from tests.clusters import Cluster, clusters, render_config, routes_of
from tests.helpers import (
    LAB_INVENTORY,
    NATS_SERVER,
    OFFLINE_PASSWORDS,
    PHX_INVENTORY,
    ansible_env,
    inventory_vars,
    issue_certificates,
    offline_vars,
    recap,
    run_playbook,
)

# The generated clusters name the offline certificates.
pytestmark = pytest.mark.usefixtures("offline_pki")


def nats_server_accepts(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(NATS_SERVER), "-t", "-c", str(path)], capture_output=True, text=True, timeout=30, check=False
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cluster=clusters())
def test_generated_clusters_render_valid_configs(cluster: Cluster, tmp_path: Path) -> None:
    for host, settings_ in cluster.hosts.items():
        text = render_config(cluster.context(host))
        path = tmp_path / f"{host}.conf"
        path.write_text(text)
        result = nats_server_accepts(path)
        assert result.returncode == 0, f"{host}: nats-server -t refused:\n{result.stderr}\n{text}"
        port = cluster.common["nats_server_cluster_port"]
        expected = {f"{v['nats_server_address']}:{port}" for h, v in cluster.hosts.items() if h != host}
        assert routes_of(text) == expected
        assert f'server_name: "{settings_["nats_server_name"]}"' in text


def test_a_broken_config_is_refused_by_the_checker(tmp_path: Path) -> None:
    """The check the role's validate step relies on really fails on a bad file."""
    path = tmp_path / "bad.conf"
    path.write_text('jetstream { max_file_store: "lots" }\ncluster { routes: [ }\n')
    assert nats_server_accepts(path).returncode != 0


@pytest.mark.parametrize("inventory", [PHX_INVENTORY, LAB_INVENTORY], ids=["phx", "lab"])
def test_inventory_renders_through_ansible(inventory: Path, tmp_path: Path) -> None:
    """render-config.yml: preflight, then each node's config checked by nats-server -t, offline."""
    result = run_playbook(
        "render-config.yml",
        inventory,
        "-e",
        offline_vars(tmp_path),
        "-e",
        f"render_dir={tmp_path}",
        "-e",
        f"nats_server_check_binary={NATS_SERVER}",
        env=ansible_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    configs = {p.stem: p.read_text() for p in tmp_path.glob("*.conf")}
    assert sorted(configs) == ["nats-1", "nats-2", "nats-3"]
    cluster_port = 6222
    hostvars = inventory_vars(inventory)["_meta"]["hostvars"]
    addresses = {host: hostvars[host]["ansible_host"] for host in configs}
    for host, text in configs.items():
        assert routes_of(text) == {f"{a}:{cluster_port}" for h, a in addresses.items() if h != host}
        assert 'name: "phx-cluster"' in text
        assert 'domain: "dgx-phx"' in text
        assert f'store_dir: "/mnt/cimstor-jetstream/{host}"' in text
        assert f'listen: "{addresses[host]}:4222"' in text
        assert_logins_hashed(text)


def assert_logins_hashed(text: str) -> None:
    """Client passwords only as bcrypt hashes that match them; TLS everywhere; a system account."""
    for name in ("nats_server_app_admin_password", "nats_server_client_cim_password", "nats_server_system_password"):
        assert OFFLINE_PASSWORDS[name] not in text, f"{name} in clear in the config"
    hashes = re.findall(r'password"?: "(\$2b\$[^"]+)"', text)
    assert len(hashes) == 4, hashes  # admin, the CIM, system, route
    for name in OFFLINE_PASSWORDS:
        assert any(bcrypt.checkpw(OFFLINE_PASSWORDS[name].encode(), h.encode()) for h in hashes), name
    # The route password appears only where a dialling member must present it.
    route_password = OFFLINE_PASSWORDS["nats_server_route_password"]
    assert all(f":{route_password}@" in line for line in text.splitlines() if route_password in line)
    assert re.search(r"^https: ", text, re.M) and not re.search(r"^http: ", text, re.M)
    assert text.count("tls {") == 2 and "verify: true" in text
    assert 'system_account: "SYS"' in text


def test_each_issued_certificate_names_every_member(offline_pki: Path) -> None:
    """Client failover needs it: a client given one member's address checks the members it
    learns against that address (docs/security.md, TLS)."""
    data = inventory_vars(LAB_INVENTORY)
    hostvars = {name: data["_meta"]["hostvars"][name] for name in data["nats_cluster"]["hosts"]}
    addresses = {ipaddress.ip_address(v["ansible_host"]) for v in hostvars.values()}
    assert len(addresses) == 3
    for host in hostvars:
        certificate = x509.load_pem_x509_certificate((offline_pki / f"{host}.crt").read_bytes())
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ips = set(names.get_values_for_type(x509.IPAddress))
        assert addresses <= ips, f"{host}: SANs {sorted(map(str, ips))} miss {sorted(map(str, addresses - ips))}"
        assert ipaddress.ip_address("127.0.0.1") in ips
        assert set(names.get_values_for_type(x509.DNSName)) == set(hostvars), f"{host}: every member's name"


def test_issuing_again_changes_no_certificate(offline_pki: Path) -> None:
    """A re-issued certificate means a reload on every deploy: the SAN list must come out in the
    same order every run (a set-ordered filter once made it differ from process to process)."""
    for _ in range(2):
        result = issue_certificates(pki_dir=offline_pki)
        changed = {host: counts["changed"] for host, counts in recap(result.stdout).items()}
        assert changed and not any(changed.values()), changed
