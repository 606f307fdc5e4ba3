"""playbooks/client-bundle.yml writes one application's bundle on the controller, from the inventory
alone: the lab inventory's own login for the CIM, every member's URL, the CA, a natscli context.

No host is contacted: ssh is a refuser that records every call and connects nowhere. The lab's CA
(.lab/pki) exists only once the lab has issued it, so the runs are given the offline test PKI's
CA instead (nats_server_tls_ca_file); everything else is the lab inventory as it is, its vaulted
passwords included (tests/__init__.py opens the lab vault).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import LAB_INVENTORY, OFFLINE_PKI, ansible_env, run_playbook
from tests.offline import refusing_ssh
from verify.inventory import Cluster, load_cluster

pytestmark = pytest.mark.slow

CLIENT = "cim"
ENV_KEYS = ("NATS_URL", "NATS_USER", "NATS_PASSWORD", "NATS_CA")


@dataclass(frozen=True)
class Run:
    result: subprocess.CompletedProcess[str]
    ssh_log: Path

    @property
    def output(self) -> str:
        return self.result.stdout + self.result.stderr

    def one_line(self) -> str:
        """The output with the callback's line wrapping undone."""
        return " ".join(self.output.split())


@dataclass(frozen=True)
class Bundle:
    run: Run
    directory: Path
    cluster: Cluster
    ca_given: Path


def bundle_run(tmp_path: Path, *args: str) -> Run:
    """client-bundle.yml on the lab inventory with the offline CA and an ssh that refuses."""
    refuser, log = refusing_ssh(tmp_path)
    result = run_playbook(
        "client-bundle.yml",
        LAB_INVENTORY,
        "-e",
        f"nats_server_tls_ca_file={OFFLINE_PKI / 'ca.crt'}",
        *args,
        env=ansible_env(ANSIBLE_SSH_EXECUTABLE=str(refuser)),
        timeout=180,
    )
    return Run(result, log)


def read_env(path: Path) -> dict[str, str]:
    """The env file as a shell reads it (`set -a; . ./env`), in an otherwise empty environment."""
    script = 'set -a; . "$0"; set +a; printf "%s\\0" "$NATS_URL" "$NATS_USER" "$NATS_PASSWORD" "$NATS_CA"'
    done = subprocess.run(
        ["env", "-i", "sh", "-c", script, str(path)], capture_output=True, text=True, timeout=10, check=True
    )
    return dict(zip(ENV_KEYS, done.stdout.split("\0")[:4], strict=True))


@pytest.fixture(scope="module")
def bundle(offline_pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The CIM's bundle, written once at -vvv (the log the secrets check reads)."""
    tmp_path = tmp_path_factory.mktemp("bundle")
    directory = tmp_path / "bundles" / CLIENT
    run = bundle_run(tmp_path, "-e", f"client={CLIENT}", "-e", f"client_bundle_dir={directory}", "-vvv")
    assert run.result.returncode == 0, run.output[-6000:]
    return Bundle(run, directory, load_cluster(LAB_INVENTORY), offline_pki / "ca.crt")


def test_bundle_holds_the_ca_the_urls_and_the_login_private_to_its_owner(bundle: Bundle) -> None:
    cluster, directory = bundle.cluster, bundle.directory
    context = f"{cluster.setting('nats_server_cluster_name')}-{CLIENT}.json"
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        ["ca.crt", "servers", "servers-by-name", "env", context]
    )
    assert directory.stat().st_mode & 0o777 == 0o700
    for path in directory.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path.name
    assert (directory / "ca.crt").read_bytes() == bundle.ca_given.read_bytes()
    # By address, as nats_server_endpoints publishes them (the certificates carry every IP) ...
    assert (directory / "servers").read_text().splitlines() == cluster.client_urls
    # ... and by inventory name, for nats.js (the certificates carry every name too).
    port = cluster.setting("nats_server_client_port")
    assert (directory / "servers-by-name").read_text().splitlines() == [
        f"tls://{node.host}:{port}" for node in cluster.nodes
    ]
    assert bundle.run.ssh_log.read_text() == "", "the bundle connected to a host"


def test_env_file_and_context_hold_the_inventorys_login(bundle: Bundle) -> None:
    cluster, directory = bundle.cluster, bundle.directory
    env = read_env(directory / "env")
    assert env == {
        "NATS_URL": ",".join(cluster.client_urls),
        "NATS_USER": CLIENT,
        "NATS_PASSWORD": cluster.clients[CLIENT].password,
        "NATS_CA": str(directory / "ca.crt"),
    }
    # natscli's context file (jsm.go natscontext): `nats --context FILE.json` reads it as it is.
    context = json.loads((directory / f"{cluster.setting('nats_server_cluster_name')}-{CLIENT}.json").read_text())
    assert context == {
        "description": f"{CLIENT} on {cluster.setting('nats_server_cluster_name')} (playbooks/client-bundle.yml)",
        "url": env["NATS_URL"],
        "user": env["NATS_USER"],
        "password": env["NATS_PASSWORD"],
        "ca": env["NATS_CA"],
    }


def test_paths_name_where_the_bundle_will_be_installed(offline_pki: Path, tmp_path: Path) -> None:
    """client_bundle_install_dir: the env file and the context name the CA where the application's
    host will keep the bundle, not where the controller wrote it."""
    directory = tmp_path / "bundles" / CLIENT
    args = (
        "-e",
        f"client={CLIENT}",
        "-e",
        f"client_bundle_dir={directory}",
        "-e",
        "client_bundle_install_dir=/etc/cim/nats",
    )
    run = bundle_run(tmp_path, *args)
    assert run.result.returncode == 0, run.output[-4000:]
    assert read_env(directory / "env")["NATS_CA"] == "/etc/cim/nats/ca.crt"
    (context,) = directory.glob("*.json")
    assert json.loads(context.read_text())["ca"] == "/etc/cim/nats/ca.crt"
    assert run.ssh_log.read_text() == ""


def test_no_secret_in_the_output(bundle: Bundle) -> None:
    assert bundle.cluster.clients[CLIENT].password
    for name, secret in bundle.cluster.secrets.items():
        assert secret not in bundle.run.output, f"{name} shows in the -vvv output"


def test_check_mode_writes_nothing(bundle: Bundle, tmp_path: Path) -> None:
    directory = tmp_path / "bundles" / CLIENT
    run = bundle_run(tmp_path, "-e", f"client={CLIENT}", "-e", f"client_bundle_dir={directory}", "--check", "--diff")
    assert run.result.returncode == 0, run.output[-4000:]
    assert f"Would write {directory}" in run.one_line()
    assert not (tmp_path / "bundles").exists()
    assert bundle.cluster.clients[CLIENT].password not in run.output
    assert run.ssh_log.read_text() == ""


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("-e", "client=nobody"), "client 'nobody' is not an application of this inventory"),
        ((), "Name the application: -e client=NAME"),
    ],
    ids=["undeclared", "missing"],
)
def test_an_application_the_inventory_does_not_declare_is_refused(
    offline_pki: Path, tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    directory = tmp_path / "bundles" / "any"
    run = bundle_run(tmp_path, *args, "-e", f"client_bundle_dir={directory}")
    assert run.result.returncode != 0, run.output[-4000:]
    assert f"{expected} (nats_server_app_clients declares: {CLIENT})" in run.one_line(), run.output[-4000:]
    assert not (tmp_path / "bundles").exists()
    assert run.ssh_log.read_text() == ""
