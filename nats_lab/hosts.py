"""The lab hosts: per-host state (overlay upper dir), starting, finding and stopping them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from nats_lab import base, launcher
from nats_lab.config import Host, Lab, LabError
from nats_lab.ssh import port_open, run_root
from nats_lab.util import kill, pid_cmdline, read_pid, run, wait_gone

LAUNCHER_MODULE = "nats_lab.launcher"
CGROUP_PREFIX = "cimlab-"
# Overrides the image's DHCP config for host0 (same name in /etc wins over /usr/lib).
NETWORK_FILE = "etc/systemd/network/80-container-host0.network"
EXPORT_MOUNT = "/srv/cimstor-export"


@dataclass(frozen=True)
class BootResult:
    host: Host
    state: str
    failed_units: tuple[str, ...]
    seconds: float


def upper_dir(lab: Lab, host: Host) -> Path:
    return lab.host_dir(host) / "upper"


def cgroup_name(host: Host) -> str:
    return CGROUP_PREFIX + host.name


def launcher_pid(lab: Lab, host: Host) -> int | None:
    return read_pid(lab.host_dir(host) / "launcher.pid", f"{LAUNCHER_MODULE} {cgroup_name(host)}")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def init_pid(lab: Lab, host: Host) -> int | None:
    """The machine pid of the container's PID 1 (its NSpid ends in 1), if it runs."""
    start = launcher_pid(lab, host)
    if start is None:
        return None
    todo = _children(start)
    while todo:
        pid = todo.pop(0)
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("NSpid:"):
                    ids = line.split()[1:]
                    if len(ids) > 1 and ids[-1] == "1":
                        return pid
        todo += _children(pid)
    return None


def _mkdirs_like(base_root: Path, upper: Path, rel: str) -> Path:
    """Create upper/REL with the owner and mode of base/REL for each level.

    The overlay shows the upper dir's attributes for a directory, so a root-owned
    upper/home/ansible would make sshd refuse the key (StrictModes).
    """
    current_base, current_upper = base_root, upper
    for part in Path(rel).parts:
        current_base, current_upper = current_base / part, current_upper / part
        if not current_upper.exists():
            current_upper.mkdir()
            st = current_base.stat()
            os.chown(current_upper, st.st_uid, st.st_gid)
            current_upper.chmod(st.st_mode & 0o7777)
    return current_upper


def _traversable_like(base_root: Path, upper: Path, path: Path) -> None:
    """Let any account reach PATH's bind mount: each existing ancestor in the image that others
    cannot enter (the image's /root is 0700) gets o+x in the upper dir."""
    for ancestor in reversed(path.parents[:-1]):
        rel = str(ancestor.relative_to("/"))
        if (base_root / rel).is_dir() and not (base_root / rel).stat().st_mode & 0o001:
            made = _mkdirs_like(base_root, upper, rel)
            made.chmod(made.stat().st_mode | 0o001)


def _write(path: Path, text: str, mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> None:
    path.write_text(text)
    os.chown(path, *owner)
    path.chmod(mode)


def _passwd_ids(root: Path, user: str) -> tuple[int, int, str]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3]), fields[5]
    raise LabError(f"user {user} missing in the base image")


def prepare(lab: Lab, host: Host, base_dir: Path) -> None:
    """Write the host's identity into its fresh upper dir (skipped if it already exists)."""
    upper = upper_dir(lab, host)
    if upper.exists():
        return
    root = base.rootfs(base_dir)
    tmp = lab.host_dir(host) / "upper.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    etc = _mkdirs_like(root, tmp, "etc")
    _write(etc / "hostname", f"{host.name}\n")
    _write(etc / "machine-id", uuid.uuid4().hex + "\n", 0o444)
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{h.address}\t{h.name}" for h in lab.machines]
    _write(etc / "hosts", "\n".join(lines) + "\n")
    marker = _mkdirs_like(root, tmp, str(Path(lab.host_marker.lstrip("/")).parent)) / Path(lab.host_marker).name
    _write(marker, f"{lab.bridge}\n")
    if host.name in lab.backup_hosts:
        for path in checkout_binds(lab):
            _traversable_like(root, tmp, path)
    network = _mkdirs_like(root, tmp, str(Path(NETWORK_FILE).parent)) / Path(NETWORK_FILE).name
    _write(
        network,
        "[Match]\nName=host0\n\n[Network]\n"
        f"Address={host.address}/{host.prefix}\n"
        "LinkLocalAddressing=no\nIPv6AcceptRA=no\n",
    )
    ssh_dir = _mkdirs_like(root, tmp, "etc/ssh")
    key = ssh_dir / "ssh_host_ed25519_key"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{host.name}", "-f", str(key)])
    uid, gid, home = _passwd_ids(root, lab.ssh_user)
    user_ssh = tmp / home.lstrip("/") / ".ssh"
    _mkdirs_like(root, tmp, home.lstrip("/"))
    user_ssh.mkdir(mode=0o700)
    os.chown(user_ssh, uid, gid)
    pub = Path(str(lab.ssh_key) + ".pub").read_text()
    _write(user_ssh / "authorized_keys", pub, 0o600, (uid, gid))
    tmp.rename(upper)


def checkout_binds(lab: Lab) -> list[Path]:
    """What a backup host needs to run the checkout's ansible-playbook: the checkout and the
    Python installation its venv was made from (pyvenv.cfg's home), both at their own paths."""
    binds = [lab.repo]
    config = lab.repo / ".venv" / "pyvenv.cfg"
    if config.is_file():
        for line in config.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home":
                binds.append(Path(value.strip()).parent)
    return binds


def nspawn_argv(lab: Lab, host: Host, base_dir: Path) -> list[str]:
    root = base.rootfs(base_dir)
    binds = [f"--bind-ro={path}" for path in checkout_binds(lab)] if host.name in lab.backup_hosts else []
    return [
        "systemd-nspawn",
        "--quiet",
        # No machined here (PID 1 is not systemd): stay in the launcher's own cgroup.
        "--keep-unit",
        "--register=no",
        "--boot",
        f"--machine={host.name}",
        f"--directory={root}",
        f"--overlay={root}:{upper_dir(lab, host)}:/",
        f"--network-bridge={lab.bridge}",
        "--resolv-conf=off",
        "--timezone=off",
        "--link-journal=no",
        "--console=read-only",
        "--bind=/dev/fuse",
        f"--bind={lab.share_dir}:{EXPORT_MOUNT}",
        *binds,
    ]


def start(lab: Lab, host: Host, base_dir: Path) -> None:
    """Start the host's launcher in the background (it detaches from us)."""
    if launcher_pid(lab, host) is not None:
        return
    remove_cgroups(host)
    log = (lab.host_dir(host) / "console.log").open("ab")
    argv = [sys.executable, "-m", LAUNCHER_MODULE, cgroup_name(host), "--"]
    argv += nspawn_argv(lab, host, base_dir)
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    log.close()
    (lab.host_dir(host) / "launcher.pid").write_text(f"{proc.pid}\n")


def wait_booted(lab: Lab, host: Host, timeout: float = 90) -> BootResult:
    """Wait until ssh answers and systemd finished booting; report failed units."""
    begin = time.monotonic()
    deadline = begin + timeout
    while not port_open(host.address):
        if launcher_pid(lab, host) is None:
            raise LabError(f"{host.name}: container exited; see {lab.host_dir(host)}/console.log")
        if time.monotonic() > deadline:
            raise LabError(f"{host.name}: no ssh after {timeout:.0f}s")
        time.sleep(0.1)
    script = (
        'state=$(systemctl is-system-running --wait); echo "$state"; '
        "systemctl list-units --failed --plain --no-legend --no-pager | awk '{print $1}'"
    )
    while True:
        remaining = max(5.0, deadline - time.monotonic())
        proc = run_root(lab, host, script, timeout=remaining)
        lines = proc.stdout.split()
        if lines and lines[0] in ("running", "degraded"):
            return BootResult(host, lines[0], tuple(lines[1:]), time.monotonic() - begin)
        if time.monotonic() > deadline:
            detail = (proc.stderr or proc.stdout).strip()
            raise LabError(f"{host.name}: did not finish booting: {detail}")
        time.sleep(0.2)


def stop(lab: Lab, hosts: tuple[Host, ...], timeout: float = 10) -> None:
    """Orderly shutdown (SIGTERM to the launchers -> nspawn), then SIGKILL what is left."""
    pids = {h: launcher_pid(lab, h) for h in hosts}
    for pid in pids.values():
        if pid is not None:
            kill(pid, signal.SIGTERM)
    wait_gone([p for p in pids.values() if p is not None], timeout)
    for host in hosts:
        # Whatever did not stop in time, or was started without our pid file: kill it.
        if cgroup_pids(host):
            kill_cgroup(host)
        remove_cgroups(host)
        (lab.host_dir(host) / "launcher.pid").unlink(missing_ok=True)


def cgroup_pids(host: Host) -> list[int]:
    pids: set[int] = set()
    for directory in launcher.cgroup_dirs(cgroup_name(host)):
        for procs in directory.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in procs.read_text().split())
    return sorted(pids)


def kill_cgroup(host: Host) -> None:
    """SIGKILL everything in the host's cgroups (the launcher, nspawn and the container)."""
    for _ in range(20):
        pids = cgroup_pids(host)
        if not pids:
            return
        for pid in pids:
            kill(pid, signal.SIGKILL)
        wait_gone(pids, 1)


def remove_cgroups(host: Host) -> None:
    """Remove the host's cgroup directories (bottom-up; they must be empty of processes)."""
    for directory in launcher.cgroup_dirs(cgroup_name(host)):
        if not directory.exists():
            continue
        subdirs = sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for sub in [*subdirs, directory]:
            with contextlib.suppress(OSError):
                sub.rmdir()
        if directory.exists():
            raise LabError(f"cannot remove cgroup {directory} (processes left: {cgroup_pids(host)})")


def stray_nspawn(lab: Lab) -> list[int]:
    """nspawn processes of this lab that no launcher pid file knows (e.g. after a crash)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        cmd = pid_cmdline(int(proc.name))
        if cmd and cmd[0].endswith("systemd-nspawn") and any(arg == f"--network-bridge={lab.bridge}" for arg in cmd):
            found.append(int(proc.name))
    return found
