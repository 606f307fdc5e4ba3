"""nats-lab against the real lab (three systemd-nspawn hosts). Leaves the lab up and healed.

The last test takes the lab down and brings it up again (fresh hosts): keep it last.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from nats_lab import cimnfs, mirror
from nats_lab.config import Host, Lab, find_repo, load_lab

pytestmark = pytest.mark.lab

PRODUCTION_NFS_OPTIONS = "rw,hard,noatime,nfsvers=4.2,timeo=600,retrans=2,_netdev"
EXPORT = "/srv/cimstor-export"


def nats_lab(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "nats-lab"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "nats_lab.cli"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout, check=False)


def on(host: str, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run SCRIPT as root on HOST through `nats-lab ssh`."""
    return nats_lab("ssh", host, "--", script, timeout=timeout)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def tcp_open(address: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    from tests.conftest import LAB_USED  # noqa: PLC0415 (the shared session bookkeeping)

    request.config.stash[LAB_USED] = True
    ok(nats_lab("up"))
    yield load_lab(find_repo())
    ok(nats_lab("heal"))


@pytest.fixture
def cimnfs_mount(lab: Lab) -> Iterator[tuple[str, str]]:
    """A fresh cimnfs mount (production options) on nats-2: (host, mount point)."""
    host = lab.hosts[1].name
    name = f"labtool-{uuid.uuid4().hex[:8]}"
    mountpoint = f"/mnt/{name}"
    ok(
        on(
            host,
            f"mkdir -p {EXPORT}/{name} {mountpoint} && "
            f"mount -t cimnfs -o {PRODUCTION_NFS_OPTIONS} cimstor:{EXPORT}/{name} {mountpoint}",
        )
    )
    yield host, mountpoint
    on(host, f"umount -l {mountpoint}; rmdir {mountpoint}; rm -rf {EXPORT}/{name}")


def test_up_is_idempotent(lab: Lab) -> None:
    begin = time.monotonic()
    out = ok(nats_lab("up"))
    assert "already up" in out
    assert time.monotonic() - begin < 5


def test_status_reports_all_hosts(lab: Lab) -> None:
    data: dict[str, Any] = json.loads(ok(nats_lab("status", "--json")))
    assert data["up"] is True
    assert data["bridge"]["address"] == f"{lab.bridge_address}/{lab.prefix}"
    assert data["mirror"]["listening"] is True
    hosts = {h["name"]: h for h in data["hosts"]}
    assert set(hosts) == {h.name for h in lab.machines}
    for host in lab.machines:
        assert hosts[host.name]["address"] == host.address
        assert hosts[host.name]["running"] and hosts[host.name]["ssh"]
        assert hosts[host.name]["faults"] == []
    assert "lab is up" in ok(nats_lab("status"))


def test_ssh_runs_as_root_and_passes_output_and_exit_code(lab: Lab) -> None:
    proc = on("nats-1", "id -un; hostname; echo to-stderr >&2; exit 7")
    assert proc.returncode == 7
    assert proc.stdout.split() == ["root", "nats-1"]
    assert "to-stderr" in proc.stderr
    # Several words are joined as ssh does.
    assert ok(nats_lab("ssh", "nats-1", "--", "echo", "a", "b")).strip() == "a b"


def test_hosts_reach_each_other_and_nothing_else(lab: Lab) -> None:
    for host in lab.hosts:
        script = "ip -4 route show; echo ---; ip route get 198.51.100.1 2>&1 || true; cat /etc/hosts"
        out = ok(on(host.name, script))
        routes, rest = out.split("---", 1)
        assert "default" not in routes
        assert routes.split()[0] == f"10.231.20.0/{lab.prefix}"
        assert "unreachable" in rest
        for other in lab.hosts:
            assert f"{other.address}\t{other.name}" in rest
    peers = " ".join(h.address for h in lab.hosts[1:])
    ok(on(lab.hosts[0].name, f"for a in {peers}; do ping -c1 -W2 $a >/dev/null || exit 1; done"))
    # No way out on the machine side either: ip_forward untouched, no NAT on the bridge.
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "0"


def test_cimnfs_mount_preserves_ownership_and_modes(lab: Lab, cimnfs_mount: tuple[str, str]) -> None:
    host, mp = cimnfs_mount
    script = f"""
set -e
grep " {mp} fuse.cimnfs " /proc/mounts
id labtool >/dev/null 2>&1 || useradd --system --no-create-home labtool
install -d -o labtool -g labtool -m 750 {mp}/data
su -s /bin/sh labtool -c 'umask 027; echo hello > {mp}/data/file; mkdir {mp}/data/dir; \
ln -s file {mp}/data/link; mv {mp}/data/file {mp}/data/renamed'
stat -c '%U:%G %a %n' {mp}/data {mp}/data/renamed {mp}/data/dir
stat -c '%U:%G %a' {EXPORT}/$(basename {mp})/data/renamed
su -s /bin/sh labtool -c 'python3 -c "
import os
fd = os.open(\\"{mp}/data/synced\\", os.O_RDWR | os.O_CREAT, 0o600)
os.write(fd, b\\"x\\" * 100000); os.fsync(fd); os.fdatasync(fd); os.ftruncate(fd, 10)
os.close(fd); print(\\"size\\", os.stat(\\"{mp}/data/synced\\").st_size)
"'
"""
    out = ok(on(host, script))
    assert "labtool:labtool 750 " in out
    assert f"labtool:labtool 640 {mp}/data/renamed" in out
    assert f"labtool:labtool 750 {mp}/data/dir" in out
    assert "labtool:labtool 640\n" in out  # the same ownership on the backing directory
    assert "size 10" in out
    # statfs reports the backing file system's real numbers (free-space checks rely on it).
    sizes = ok(on(host, f"stat -f -c '%b %S' {mp} {EXPORT}")).split("\n")
    assert sizes[0] == sizes[1]


def test_jetstream_r3_filestore_on_cimnfs(lab: Lab) -> None:
    """A 3-node JetStream cluster (ports apart from the roles') keeps an R3 file stream on cimnfs."""
    version = mirror.server_version(lab.repo)
    top = mirror.archive_top(version)
    routes = ",".join(f"nats://{h.address}:16222" for h in lab.hosts)
    run_id = uuid.uuid4().hex[:8]

    def start(host: Host) -> str:
        mp, backing = f"/mnt/labtool-js-{run_id}", f"{EXPORT}/labtool-js-{run_id}/{host.name}"
        return ok(
            on(
                host.name,
                f"""
set -e
cd /tmp && curl -sSf {lab.mirror_url}/v{version}/{mirror.archive_name(version)} | tar xz
id labtool >/dev/null 2>&1 || useradd --system --no-create-home labtool
mkdir -p {backing} {mp}
mount -t cimnfs -o {PRODUCTION_NFS_OPTIONS} cimstor:{backing} {mp}
install -d -o labtool -g labtool {mp}/js
systemctl reset-failed labtool-nats 2>/dev/null || true
systemd-run --unit=labtool-nats -p User=labtool /tmp/{top}/nats-server -n labtool-{host.name} \
  -js -sd {mp}/js -a {host.address} -p 14222 -m 18222 \
  --cluster_name labtool --cluster nats://{host.address}:16222 --routes {routes}
""",
            )
        )

    def stop(host: Host) -> None:
        mp = f"/mnt/labtool-js-{run_id}"
        on(host.name, f"systemctl stop labtool-nats; umount -l {mp}; rmdir {mp}")

    with ThreadPoolExecutor(len(lab.hosts)) as pool:
        try:
            list(pool.map(start, lab.hosts))
            urls = [f"nats://{h.address}:14222" for h in lab.hosts]
            messages, data, replicas = asyncio.run(_r3_round_trip(urls))
            assert (messages, data) == (100, b"event-42")
            assert replicas == 2  # two followers besides the leader
            owners = ok(
                on(lab.hosts[0].name, f"find /mnt/labtool-js-{run_id}/js -mindepth 1 -printf '%u\\n' | sort -u")
            )
            assert owners.split() == ["labtool"]
            # One export holds the three stores, as on the real share.
            assert sorted(os.listdir(lab.share_dir / f"labtool-js-{run_id}")) == sorted(h.name for h in lab.hosts)
        finally:
            list(pool.map(stop, lab.hosts))
            shutil.rmtree(lab.share_dir / f"labtool-js-{run_id}", ignore_errors=True)


async def _r3_round_trip(urls: list[str]) -> tuple[int, bytes, int]:
    import nats  # noqa: PLC0415
    from nats.js.errors import APIError  # noqa: PLC0415

    nc = await nats.connect(servers=urls, connect_timeout=5)
    try:
        js = nc.jetstream(timeout=10)
        deadline = time.monotonic() + 30
        while True:  # the meta group needs a few seconds to elect a leader after start
            try:
                await js.add_stream(name="LABTOOL", subjects=["labtool.>"], storage="file", num_replicas=3)
                break
            except (APIError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        for i in range(100):
            await js.publish(f"labtool.{i % 7}", f"event-{i}".encode())
        info = await js.stream_info("LABTOOL")
        msg = await js.get_msg("LABTOOL", 43)
        replicas = len(info.cluster.replicas or []) if info.cluster else 0
        await js.delete_stream("LABTOOL")
        return info.state.messages, msg.data or b"", replicas
    finally:
        await nc.close()


def test_stale_storage_fault_and_heal(lab: Lab, cimnfs_mount: tuple[str, str]) -> None:
    host, mp = cimnfs_mount
    ok(on(host, f"echo before > {mp}/kept"))
    try:
        ok(nats_lab("fault", "stale-storage", host))
        proc = on(host, f"stat {mp}")
        assert proc.returncode != 0
        assert "Stale file handle" in proc.stderr
        assert "Stale file handle" in on(host, f"echo x > {mp}/new").stderr
        status = json.loads(nats_lab("status", "--json").stdout)
        assert [h["faults"] for h in status["hosts"] if h["name"] == host] == [["stale-storage"]]
    finally:
        ok(nats_lab("heal", host))
    assert ok(on(host, f"stat -c %F {mp} && cat {mp}/kept")).split() == ["directory", "before"]
    assert "fuse.cimnfs" in ok(on(host, f"grep ' {mp} ' /proc/mounts"))


def test_isolate_fault_and_heal(lab: Lab) -> None:
    target, other = lab.hosts[2], lab.hosts[0]
    assert tcp_open(target.address, 22)
    try:
        ok(nats_lab("fault", "isolate", target.name))
        assert not tcp_open(target.address, 22)
        assert on(other.name, f"ping -c1 -W1 {target.address}").returncode != 0
        ok(on(other.name, f"ping -c1 -W1 {lab.hosts[1].address}"))
        assert on(target.name, "true").returncode == 255  # ssh cannot reach it
        assert nats_lab("status").returncode != 0
    finally:
        ok(nats_lab("heal", target.name))
    assert tcp_open(target.address, 22)
    ok(on(other.name, f"ping -c1 -W2 {target.address}"))
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    assert "cimlab" not in out.stdout


def test_kill_fault_and_heal_keeps_the_host_state(lab: Lab) -> None:
    target = lab.hosts[2]
    boot_id = ok(on(target.name, "echo kept > /var/tmp/labtool-marker; cat /proc/sys/kernel/random/boot_id"))
    try:
        ok(nats_lab("fault", "kill", target.name))
        time.sleep(1)  # the launcher must not bring it back by itself
        status = json.loads(nats_lab("status", "--json").stdout)
        host_info = next(h for h in status["hosts"] if h["name"] == target.name)
        assert host_info["running"] is False
        assert host_info["faults"] == ["kill"]
        assert not tcp_open(target.address, 22, timeout=0.5)
        assert "heal" in nats_lab("ssh", target.name, "--", "true").stderr
    finally:
        ok(nats_lab("heal", target.name))
    out = ok(on(target.name, "cat /var/tmp/labtool-marker /proc/sys/kernel/random/boot_id"))
    assert out.split()[0] == "kept"
    assert out.split()[1] != boot_id.strip()


def _lab_runs_this_stand_in(host: str) -> None:
    """The hosts come from the base image made with mount.cimnfs as it was then: refuse an old one."""
    here = hashlib.sha256(Path(cimnfs.__file__).read_bytes()).hexdigest()
    there = ok(on(host, "sha256sum /usr/sbin/mount.cimnfs")).split()[0]
    if there != here:
        pytest.fail("the lab hosts run an older mount.cimnfs: run `nats-lab down` (then the tests bring it up anew)")


WRITER = """
import os, time
mp = {mp!r}
unsynced = os.open(mp + "/unsynced", os.O_WRONLY | os.O_CREAT, 0o644)
os.write(unsynced, b"u" * 200000)
synced = os.open(mp + "/synced", os.O_WRONLY | os.O_CREAT, 0o644)
os.write(synced, b"s" * 200000)
os.fsync(synced)
os.write(synced, b"after the fsync")
open({ready!r}, "w").close()
time.sleep(600)  # both files stay open: no close flushes them
"""


def test_power_loss_keeps_fsynced_writes_and_loses_unsynced_ones(lab: Lab) -> None:
    host = lab.hosts[1]
    _lab_runs_this_stand_in(host.name)
    name = f"labtool-power-{uuid.uuid4().hex[:8]}"
    mp, backing, ready = f"/mnt/{name}", lab.share_dir / name, f"/run/{name}.ready"
    fstab = f"cimstor:{EXPORT}/{name} {mp} cimnfs {PRODUCTION_NFS_OPTIONS} 0 0"
    script = WRITER.format(mp=mp, ready=ready)
    try:
        ok(
            on(
                host.name,
                f"""
set -e
mkdir -p {EXPORT}/{name} {mp}
echo '{fstab}' >> /etc/fstab
systemctl daemon-reload
mount {mp}
cat > /tmp/{name}.py <<'PY'
{script}
PY
systemd-run --unit={name} python3 /tmp/{name}.py
for i in $(seq 100); do test -e {ready} && exit 0; sleep 0.1; done
echo "writer not ready" >&2; exit 1
""",
            )
        )
        # Before the cut: the share has the fsynced bytes only, the host sees both files whole.
        assert (backing / "synced").read_bytes() == b"s" * 200000
        assert (backing / "unsynced").read_bytes() == b""
        assert ok(on(host.name, f"stat -c %s {mp}/unsynced {mp}/synced")).split() == ["200000", "200015"]
        out = ok(nats_lab("fault", "power-loss", host.name))
        assert "power cut on " + host.name in out
        status = json.loads(nats_lab("status", "--json").stdout)
        info = next(h for h in status["hosts"] if h["name"] == host.name)
        assert (info["running"], info["faults"]) == (False, ["power-loss"])
        assert "lost power" in nats_lab("ssh", host.name, "--", "true").stderr
        # What the share kept: the fsynced bytes exactly; the unsynced file exists (create is synchronous), empty.
        assert (backing / "synced").read_bytes() == b"s" * 200000
        assert (backing / "unsynced").read_bytes() == b""
        healed = ok(nats_lab("heal", host.name))
        assert f"{host.name}: power back" in healed and mp in healed
        # Booted again, its fstab mounted the share, and the host reads what the share kept.
        out = ok(on(host.name, f"grep -c ' {mp} fuse.cimnfs ' /proc/mounts; stat -c %s {mp}/synced {mp}/unsynced"))
        assert out.split() == ["1", "200000", "0"]
    finally:
        nats_lab("heal", host.name)  # a no-op unless the test stopped half way
        on(
            host.name,
            f"systemctl stop {name} 2>/dev/null; umount -l {mp}; rmdir {mp}; rm -f /tmp/{name}.py {ready}; "
            f"grep -v ' {mp} ' /etc/fstab > /etc/fstab.{name} && cat /etc/fstab.{name} > /etc/fstab; "
            f"rm -f /etc/fstab.{name}; systemctl daemon-reload",
        )
        shutil.rmtree(backing, ignore_errors=True)


def test_power_loss_of_the_whole_site_and_heal(lab: Lab) -> None:
    boot_ids = {h.name: ok(on(h.name, "cat /proc/sys/kernel/random/boot_id")).strip() for h in lab.hosts}
    try:
        out = ok(nats_lab("fault", "power-loss", "all"))
        assert "at once" in out
        status = json.loads(nats_lab("status", "--json").stdout)
        site = {h.name for h in lab.hosts}
        # The site goes dark; the monitoring host outside it does not.
        assert [(h["running"], h["faults"]) for h in status["hosts"] if h["name"] in site] == [
            (False, ["power-loss"])
        ] * len(lab.hosts)
        assert [(h["running"], h["faults"]) for h in status["hosts"] if h["name"] not in site] == [(True, [])] * len(
            lab.monitors
        )
    finally:
        healed = ok(nats_lab("heal"))
    assert healed.count("power back") == len(lab.hosts)
    for host in lab.hosts:
        assert ok(on(host.name, "cat /proc/sys/kernel/random/boot_id")).strip() != boot_ids[host.name]
    assert json.loads(nats_lab("status", "--json").stdout)["up"] is True


def test_reboot_inside_a_host_boots_it_again(lab: Lab) -> None:
    target = lab.hosts[0]
    launcher = (lab.host_dir(target) / "launcher.pid").read_text()
    boot_id = ok(on(target.name, "cat /proc/sys/kernel/random/boot_id"))
    on(target.name, "systemctl reboot")
    deadline = time.monotonic() + 60
    while True:
        proc = on(target.name, "systemctl is-system-running --wait; cat /proc/sys/kernel/random/boot_id")
        if proc.returncode == 0 and boot_id not in proc.stdout:
            break
        assert time.monotonic() < deadline, f"{target.name} did not come back: {proc.stderr}"
        time.sleep(0.5)
    assert proc.stdout.split()[0] == "running"
    assert (lab.host_dir(target) / "launcher.pid").read_text() == launcher  # same launcher looped


def test_mirror_serves_versions_with_matching_checksums(lab: Lab) -> None:
    for version in mirror.server_versions(lab.repo):
        base = f"{lab.mirror_url}/v{version}"
        archive = _get(f"{base}/{mirror.archive_name(version)}")
        sums = mirror.parse_sums(_get(f"{base}/SHA256SUMS").decode())
        assert sums == {mirror.archive_name(version): hashlib.sha256(archive).hexdigest()}
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            member = tar.getmember(f"{mirror.archive_top(version)}/nats-server")
            assert member.mode & 0o111
            binary = tar.extractfile(member)
            assert binary is not None
            assert f"v{version}".encode() in binary.read()
        tampered = _get(f"{lab.mirror_url}/tampered/v{version}/{mirror.archive_name(version)}")
        tampered_sums = mirror.parse_sums(_get(f"{lab.mirror_url}/tampered/v{version}/SHA256SUMS").decode())
        assert tampered_sums == sums
        assert hashlib.sha256(tampered).hexdigest() != sums[mirror.archive_name(version)]
    # The hosts reach it too, and it listens on the bridge address only.
    ok(on("nats-1", f"curl -sSf -o /dev/null {lab.mirror_url}/v{mirror.server_version(lab.repo)}/SHA256SUMS"))
    assert not tcp_open("127.0.0.1", lab.mirror_port)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        data: bytes = response.read()
    return data


def test_zz_down_leaves_nothing_then_up_again(lab: Lab) -> None:
    """Runs last: the lab comes back with fresh hosts."""
    begin = time.monotonic()
    ok(nats_lab("down"))
    assert time.monotonic() - begin < 15
    assert not Path(f"/sys/class/net/{lab.bridge}").exists()
    assert not (lab.state / "hosts").exists()
    assert not (lab.state / "share").exists()
    nft = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    assert "cimlab" not in nft.stdout
    nspawn = [
        pid
        for pid in os.listdir("/proc")
        if pid.isdigit() and _cmdline(pid).startswith(("systemd-nspawn", "/usr/bin/systemd-nspawn"))
    ]
    assert nspawn == []
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"):
        assert not list(Path(root).glob("cimlab-*"))
    with pytest.raises(urllib.error.URLError):
        _get(f"{lab.mirror_url}/")
    ok(nats_lab("down"))  # idempotent
    begin = time.monotonic()
    ok(nats_lab("up"))
    assert time.monotonic() - begin < 30
    assert json.loads(nats_lab("status", "--json").stdout)["up"] is True


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
