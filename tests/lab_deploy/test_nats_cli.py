"""The operators' own tool, natscli, installed as operators install it (playbooks/natscli.yml,
from the lab mirror's copy of the pinned release), against the deployed lab: the guide's commands
through a context, as docs/clients.md gives them. The CIM's context is
the one its client bundle writes; the operator's (the APP administrator) and the system user's are
written the same way from the inventory's logins, each with the cluster's CA."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from nats_lab import mirror
from tests.clients import bundle_env
from tests.helpers import LAB_INVENTORY, REPO, run_playbook
from verify.inventory import Cluster, Login

pytestmark = pytest.mark.lab

STREAM = "INFRASTRUCTURE_EVENTS"


@pytest.fixture(scope="module")
def natscli(deployed_lab: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """playbooks/natscli.yml with the lab inventory (its mirror), into a directory of the test's."""
    directory = tmp_path_factory.mktemp("natscli")
    installed = run_playbook(
        "natscli.yml",
        LAB_INVENTORY,
        "-e",
        f"natscli_install_dir={directory / 'lib'}",
        "-e",
        f"natscli_bin_dir={directory / 'bin'}",
        timeout=180,
    )
    assert installed.returncode == 0, installed.stdout[-4000:]
    command = directory / "bin" / "nats"
    version = mirror.natscli_version(REPO)
    assert os.readlink(command) == str(directory / "lib" / version / "nats")
    reported = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=30, check=True)
    assert reported.stdout.strip().removeprefix("v") == version
    return command


def write_context(tmp_path: Path, cluster: Cluster, login: Login) -> Path:
    """A natscli context file with the fields the client bundle writes."""
    path = tmp_path / f"{login.user}.json"
    context = {
        "description": f"{login.user} (test)",
        "url": ",".join(cluster.client_urls),
        "user": login.user,
        "password": login.password,
        "ca": str(cluster.ca_file),
    }
    path.write_text(json.dumps(context))
    path.chmod(0o600)
    return path


def nats(natscli: Path, tmp_path: Path, context: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`nats --context CONTEXT ARGS` with a HOME of its own: no selected context, no NATS_* variables."""
    return subprocess.run(
        [str(natscli), "--context", str(context), *args],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_cims_bundle_context_reads_its_account_and_its_stream(
    deployed_lab: Cluster, natscli: Path, tmp_path: Path
) -> None:
    cluster = deployed_lab
    bundle_env(cluster.inventory, "cim")
    context = REPO / "build" / "test-bundles" / "cim" / f"{cluster.setting('nats_server_cluster_name')}-cim.json"

    account = nats(natscli, tmp_path, context, "account", "info")
    assert account.returncode == 0, account.stderr
    domain = cluster.setting("nats_server_jetstream_domain")
    assert f"JetStream Account Information for domain {domain}:" in account.stdout, account.stdout
    assert "TLS Verified: issuer CN=" in account.stdout, account.stdout

    stream = nats(natscli, tmp_path, context, "stream", "info", STREAM)
    assert stream.returncode == 0, stream.stderr
    lines = [line.strip() for line in stream.stdout.splitlines()]
    assert "Replicas: 3" in lines and "Discard Policy: New" in lines, stream.stdout
    replicas = [line for line in lines if line.startswith("Replica: ")]
    assert len(replicas) == 2 and all(", current," in line for line in replicas), replicas

    # Least privilege: the CIM's login may not list the account's streams.
    listed = nats(natscli, tmp_path, context, "stream", "ls")
    assert listed.returncode != 0 and "$JS.API.STREAM.LIST" in listed.stderr, (listed.stdout, listed.stderr)


def test_the_operators_commands_as_the_administrator_and_the_system_user(
    deployed_lab: Cluster, natscli: Path, tmp_path: Path
) -> None:
    cluster = deployed_lab
    admin, system = write_context(tmp_path, cluster, cluster.admin), write_context(tmp_path, cluster, cluster.system)

    streams = nats(natscli, tmp_path, admin, "stream", "ls")
    assert streams.returncode == 0 and STREAM in streams.stdout, (streams.stdout, streams.stderr)
    check = nats(natscli, tmp_path, admin, "server", "check", "jetstream")
    assert check.returncode == 0 and check.stdout.startswith("OK JetStream"), (check.stdout, check.stderr)
    assert "replicas_fail=0" in check.stdout and "replicas_no_leader=0" in check.stdout, check.stdout

    members = nats(natscli, tmp_path, system, "server", "list", str(len(cluster.nodes)))
    assert members.returncode == 0, members.stderr
    for node in cluster.nodes:
        assert node.host in members.stdout, (node.host, members.stdout)
    report = nats(natscli, tmp_path, system, "server", "report", "jetstream")
    assert report.returncode == 0, report.stderr
    meta = [line for line in report.stdout.splitlines() if any(f" {node.host} " in line for node in cluster.nodes)]
    leaders = [line for line in meta if "│ yes " in line]
    assert len(leaders) == 1, report.stdout
