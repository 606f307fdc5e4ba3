"""Each host as testinfra sees it over the inventory's SSH: service, binary, config, ports,
storage mount (really probed, so a stale NFS handle shows), unit properties."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from verify.inventory import Cluster, Node
from verify.streams import stream_spec

pytestmark = pytest.mark.host

BINARY = "/usr/local/sbin/nats-server"
CONFIG = "/etc/nats-server/nats-server.conf"
TLS_FILES = ("ca.crt", "server.crt", "server.key")
TLS_DIR = "/etc/nats-server/tls"
UNIT = "nats-server"
# A stale or hung NFS mount must not hang the run: every storage probe is cut off after this.
PROBE_SECONDS = 4


def run(host: Any, command: str) -> Any:
    return host.run(f"timeout {PROBE_SECONDS} {command}")


@pytest.mark.runbook("service")
def test_service_active_and_enabled(nats_host: Any, nats_node: Node) -> None:
    service = nats_host.service(UNIT)
    assert service.is_running, f"{nats_node.host}: nats-server is not running"
    assert service.is_enabled, f"{nats_node.host}: nats-server is not enabled at boot"


@pytest.mark.runbook("service")
def test_runs_as_the_service_account(nats_host: Any, nats_node: Node) -> None:
    users = {p.user for p in nats_host.process.filter(comm="nats-server")}
    assert users == {nats_node["nats_server_user"]}, f"{nats_node.host}: nats-server runs as {users or 'nobody'}"


@pytest.mark.runbook("config")
def test_binary_is_the_pinned_version(nats_host: Any, nats_node: Node) -> None:
    version = nats_host.run(f"{BINARY} --version").stdout.strip()
    assert version == f"nats-server: v{nats_node['nats_server_version']}", f"{nats_node.host}: {version}"


@pytest.mark.runbook("config")
def test_config_owned_and_accepted(nats_host: Any, nats_node: Node) -> None:
    config = nats_host.file(CONFIG)
    assert config.exists, f"{nats_node.host}: {CONFIG} is missing"
    assert (config.user, config.group, config.mode) == ("root", nats_node["nats_server_group"], 0o640), (
        f"{nats_node.host}: {CONFIG} is {config.user}:{config.group} {oct(config.mode)}"
    )
    checked = nats_host.run(f"{BINARY} -t -c {CONFIG}")
    assert checked.rc == 0, f"{nats_node.host}: nats-server -t refuses {CONFIG}: {checked.stderr.strip()}"


@pytest.mark.runbook("config")
def test_tls_files_readable_by_the_server_only(nats_host: Any, nats_node: Node) -> None:
    """The key above all: root may change it, the nats group may read it, nobody else."""
    group = nats_node["nats_server_group"]
    wanted = {TLS_DIR: f"root {group} 750"} | {f"{TLS_DIR}/{n}": f"root {group} 640" for n in TLS_FILES}
    # One stat for all four (a File object would ask once per attribute, over SSH each time).
    listed = nats_host.run(f"stat -c '%n %U %G %a' {' '.join(wanted)}")
    found = dict(line.split(" ", 1) for line in listed.stdout.splitlines() if " " in line)
    wrong = [f"{path} is {found.get(path, 'missing')}" for path, mode in wanted.items() if found.get(path) != mode]
    assert not wrong, f"{nats_node.host}: {'; '.join(wrong)} (want root:{group}, 0750 for the directory, 0640 files)"


@pytest.mark.runbook("service")
def test_ports_listening(nats_host: Any, nats_node: Node) -> None:
    for kind in ("client", "cluster", "monitor"):
        address = nats_node[f"nats_server_{kind}_host"]
        port = nats_node[f"nats_server_{kind}_port"]
        assert nats_host.socket(f"tcp://{address}:{port}").is_listening, (
            f"{nats_node.host}: nothing listens on {kind} {address}:{port}"
        )


@pytest.mark.runbook("storage")
def test_store_dir_on_the_expected_mount(nats_host: Any, nats_node: Node) -> None:
    store_dir = nats_node["nats_server_jetstream_store_dir"]
    mount_path = nats_node["jetstream_storage_mount_path"]
    found = run(nats_host, f"findmnt -J -o TARGET,SOURCE,FSTYPE -T {store_dir}")
    assert found.rc == 0, f"{nats_node.host}: cannot find the mount of {store_dir}: {found.stderr.strip()}"
    (mount,) = json.loads(found.stdout)["filesystems"]
    if nats_node["jetstream_storage_backend"] == "local":
        return
    fstype = nats_node["jetstream_storage_mount_fstype"]
    assert mount["target"] == mount_path, f"{nats_node.host}: {store_dir} is on {mount['target']}, not on the share"
    assert mount["fstype"] in {fstype, f"fuse.{fstype}"}, f"{nats_node.host}: {mount_path} is {mount['fstype']}"
    assert mount["source"] == nats_node["jetstream_storage_mount_source"], (
        f"{nats_node.host}: mounted from {mount['source']}"
    )
    fstab = run(nats_host, f"findmnt --fstab -J -o OPTIONS {mount_path}")
    options = set(json.loads(fstab.stdout)["filesystems"][0]["options"].split(",")) if fstab.rc == 0 else set()
    wanted = set(nats_node["jetstream_storage_mount_options"].split(","))
    assert wanted <= options, f"{nats_node.host}: fstab options lack {sorted(wanted - options)}"


@pytest.mark.runbook("storage")
def test_storage_answers_stat_and_write_probe(nats_host: Any, nats_node: Node) -> None:
    """stat -c %n asks for nothing and misses a stale handle: this stats, writes, fsyncs, reads."""
    store_dir = nats_node["nats_server_jetstream_store_dir"]
    user = nats_node["nats_server_user"]
    probe = f"{store_dir}/.verify-probe"
    script = f"stat {store_dir} >/dev/null && printf ok > {probe} && sync {probe} && cat {probe} && rm -f {probe}"
    result = run(nats_host, f"runuser -u {user} -- sh -c '{script}'")
    detail = (result.stderr.strip() or f"rc {result.rc}").splitlines()[-1]
    if result.rc == 124:
        detail = f"no answer within {PROBE_SECONDS} s (hung mount)"
    assert result.rc == 0 and result.stdout == "ok", f"{nats_node.host}: storage probe failed: {detail}"


@pytest.mark.runbook("storage")
def test_free_space_and_limits_fit_on_the_share(
    nats_host: Any, nats_node: Node, nats_cluster: Cluster, request: pytest.FixtureRequest
) -> None:
    mount_path = nats_node["jetstream_storage_mount_path"]
    result = run(nats_host, f"stat -f -c '%a %b %S' {mount_path}")
    assert result.rc == 0, f"{nats_node.host}: cannot read free space of {mount_path}: {result.stderr.strip()}"
    available, total, block = (int(x) for x in result.stdout.split())
    free, size = available * block, total * block
    minimum = request.config.getoption("--min-free-bytes")
    assert free >= minimum, f"{nats_node.host}: only {free >> 20} MiB free on {mount_path}"
    sharing = [
        n
        for n in nats_cluster.nodes
        if n.settings.get("jetstream_storage_mount_source") == nats_node["jetstream_storage_mount_source"]
    ]
    if nats_node["jetstream_storage_backend"] == "local":
        sharing = [nats_node]
    limits = sum(stream_spec().parse_server_size(n["nats_server_jetstream_max_file_store"]) for n in sharing)
    assert limits <= size, (
        f"{nats_node.host}: max_file_store of {len(sharing)} node(s) on this share is {limits >> 30} GiB, "
        f"the share holds {size >> 30} GiB"
    )


@pytest.mark.runbook("storage")
def test_ownership_marker_names_this_server(nats_host: Any, nats_node: Node) -> None:
    result = run(nats_host, f"cat {nats_node['nats_server_jetstream_store_marker']}")
    assert result.rc == 0, f"{nats_node.host}: ownership marker unreadable: {result.stderr.strip()}"
    owner = result.stdout.strip()
    assert owner == nats_node.server_name, f"{nats_node.host}: store owned by {owner!r}, not {nats_node.server_name}"


@pytest.mark.runbook("config")
def test_unit_guards_storage_and_lame_duck(nats_host: Any, nats_node: Node) -> None:
    shown = nats_host.run(f"systemctl show {UNIT} -p RequiresMountsFor -p TimeoutStopUSec -p LimitNOFILE -p KillSignal")
    properties = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
    assert nats_node["nats_server_jetstream_store_dir"] in properties.get("RequiresMountsFor", "").split(), properties
    lame_duck = int(nats_node["nats_server_lame_duck_duration_seconds"]) + int(
        nats_node["nats_server_lame_duck_grace_period_seconds"]
    )
    assert _seconds(properties.get("TimeoutStopUSec", "0")) > lame_duck, (
        f"{nats_node.host}: TimeoutStopSec {properties.get('TimeoutStopUSec')} "
        f"would SIGKILL lame duck mode ({lame_duck} s)"
    )
    assert int(properties.get("LimitNOFILE", "0")) >= int(nats_node["nats_server_limit_nofile"]), properties
    assert properties.get("KillSignal") == "12", f"{nats_node.host}: stop does not use lame duck (SIGUSR2)"


def _seconds(systemd_span: str) -> float:
    """'2min 10s' / '70s' / '1min' -> seconds."""
    units = {"min": 60.0, "s": 1.0, "ms": 0.001, "h": 3600.0}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(min|ms|s|h)", systemd_span))


# `systemd-analyze security` of upstream's util/nats-server-hardened.service (nats-server repo),
# measured on a lab host with Debian 12's systemd 252 (docs/security.md). Ours adds storage guards
# and must not be more exposed than it.
UPSTREAM_HARDENED_EXPOSURE = 1.7


@pytest.mark.runbook("config")
def test_unit_exposure_at_or_below_upstream_hardened(nats_host: Any, nats_node: Node) -> None:
    result = nats_host.run(f"timeout 20 systemd-analyze security --no-pager {UNIT}")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, f"{nats_node.host}: systemd-analyze security gave no figure: {result.stderr.strip()[:300]}"
    exposure = float(match.group(1))
    assert exposure <= UPSTREAM_HARDENED_EXPOSURE, (
        f"{nats_node.host}: the unit's exposure is {exposure}, above upstream's hardened unit "
        f"({UPSTREAM_HARDENED_EXPOSURE})"
    )


@pytest.mark.runbook("config")
def test_server_can_write_only_its_store_and_runtime_dir(nats_host: Any, nats_node: Node) -> None:
    """Tried inside the running server's own mount namespace: its user can write a file in the
    store and the pid directory; not even root can write the binary, config or the rest of the
    system there (ProtectSystem=strict with ReadWritePaths of the store only)."""
    pid = nats_host.run(f"systemctl show -p MainPID --value {UNIT}").stdout.strip()
    assert pid not in ("", "0"), f"{nats_node.host}: nats-server is not running"
    user, group = nats_node["nats_server_user"], nats_node["nats_server_group"]

    def attempt(directory: str, as_service_user: bool) -> str:
        probe = f"{directory}/.verify-write-probe"
        become = f"setpriv --reuid={user} --regid={group} --init-groups " if as_service_user else ""
        command = f"timeout {PROBE_SECONDS} nsenter -t {pid} -m -- {become}sh -c 'touch {probe} && rm -f {probe}'"
        return f"if {command} 2>/dev/null; then echo 'yes {directory}'; else echo 'no {directory}'; fi"

    store = nats_node["nats_server_jetstream_store_dir"]
    forbidden = ["/etc/nats-server", "/opt/nats-server", "/usr/local/sbin", "/var/lib", "/etc", "/root"]
    # Every attempt in one SSH round trip.
    script = "; ".join([attempt(p, True) for p in (store, "/run/nats-server")] + [attempt(p, False) for p in forbidden])
    answers = {line.split(" ", 1)[1]: line.startswith("yes") for line in nats_host.run(script).stdout.splitlines()}
    allowed = {path: answers.get(path, False) for path in (store, "/run/nats-server")}
    assert all(allowed.values()), f"{nats_node.host}: the server cannot write {allowed}"
    written = [path for path in forbidden if answers.get(path, True)]
    assert not written, f"{nats_node.host}: inside the server's sandbox root could write {written}"
