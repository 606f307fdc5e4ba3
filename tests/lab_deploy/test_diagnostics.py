"""collect-diagnostics.yml on the lab: one archive with every node's endpoints, journal, mounts
and disks; nothing on the hosts changes; a stopped node is recorded, not fatal."""

from __future__ import annotations

import io
import json
import re
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.clients import natscli_binary
from tests.helpers import LAB_INVENTORY, nats_lab, run_playbook, wait_healthy
from verify.inventory import Cluster

pytestmark = pytest.mark.lab
FILES = {
    "varz.json",
    "jsz.json",
    "healthz.json",
    "routez.json",
    "raftz.json",
    "journal.txt",
    "unit.txt",
    "mounts.txt",
    "disks.txt",
}


def collect(tmp_path: Path, *extra: str) -> tuple[dict[str, str], str]:
    result = run_playbook("collect-diagnostics.yml", LAB_INVENTORY, "-e", f"diagnostics_root={tmp_path}", *extra)
    assert result.returncode == 0, result.stdout[-3000:]
    archive = Path(re.findall(r"Diagnostics archive: (\S+\.tar\.gz)", result.stdout)[0])
    assert archive.parent == tmp_path and archive.exists()
    with tarfile.open(archive) as tar:
        files = {
            "/".join(Path(m.name).parts[1:]): tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }
    # A zip (natscli's audit archive) is given as the list of its members' names.
    return {
        name: "\n".join(zipfile.ZipFile(io.BytesIO(data)).namelist()) if name.endswith(".zip") else data.decode()
        for name, data in files.items()
    }, result.stdout


def identities(cluster: Cluster) -> dict[str, str]:
    return {
        n.host: nats_lab(
            "ssh", n.host, "--", "systemctl show nats-server -p MainPID --value; md5sum /etc/nats-server/*"
        ).stdout
        for n in cluster.nodes
    }


def test_collects_every_node_into_one_archive_and_changes_nothing(deployed_lab: Cluster, tmp_path: Path) -> None:
    before = identities(deployed_lab)
    # natscli found where playbooks/natscli.yml installs it (its natscli_bin_dir), not on PATH.
    files, output = collect(tmp_path, "-e", f"natscli_bin_dir={natscli_binary().parent}")
    for node in deployed_lab.nodes:
        assert {f"{node.host}/{name}" for name in FILES} <= set(files), sorted(files)
        assert json.loads(files[f"{node.host}/varz.json"])["server_name"] == node.server_name
        assert "nats-server" in files[f"{node.host}/journal.txt"]
        assert node["jetstream_storage_mount_path"] in files[f"{node.host}/mounts.txt"]
        # natscli's cluster-wide reports, as the system account's user.
        assert node.host in files["server-list.txt"], files["server-list.txt"]
        assert f" {node.host} " in files["server-report-jetstream.txt"], files["server-report-jetstream.txt"]
    assert "RAFT Meta Group Information" in files["server-report-jetstream.txt"]
    # natscli's audit archive: every server's endpoints and every stream of the application account.
    audit = files["audit-gather.zip"].splitlines()
    cluster = deployed_lab.nodes[0]["nats_server_cluster_name"]
    for node in deployed_lab.nodes:
        assert f"capture/clusters/{cluster}/{node.server_name}/health/0001.json" in audit, audit
        assert f"capture/clusters/{cluster}/{node.server_name}/jetstream_info/0001.json" in audit, audit
    assert any("INFRASTRUCTURE_EVENTS" in name for name in audit), audit
    assert deployed_lab.system.password not in output
    assert identities(deployed_lab) == before


def test_a_stopped_node_is_recorded_not_fatal(deployed_lab: Cluster, tmp_path: Path) -> None:
    assert nats_lab("fault", "stop", "nats-3").returncode == 0
    try:
        files, _ = collect(tmp_path, "-e", f"diagnostics_natscli={tmp_path / 'no-natscli-here'}")
    finally:
        nats_lab("heal", "nats-3")
    assert files["nats-3/varz.json"].startswith("no answer"), files["nats-3/varz.json"][:200]
    assert files["natscli.txt"].startswith("natscli not found on the controller"), files["natscli.txt"]
    assert "Stopped" in files["nats-3/journal.txt"] or "Stopping" in files["nats-3/journal.txt"]
    assert json.loads(files["nats-1/healthz.json"])
    wait_healthy(deployed_lab)
