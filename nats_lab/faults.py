"""Fault injection and healing: stop, kill, power-loss, isolate, cut-routes, stale-storage.

Active faults are kept in .lab/faults.json ({host: {kind: detail}}) so that `status` can
show them and `heal` knows what to undo.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats_lab import cimnfs, hosts, launcher, net
from nats_lab.config import Host, Lab, LabError
from nats_lab.ssh import root_command, run_root, ssh_argv
from nats_lab.util import kill, say, wait_gone

KINDS = ("stop", "kill", "power-loss", "isolate", "cut-routes", "stale-storage", "destroy")
# Undo in this order: a host must be reachable again before anything is done on it, and
# running (booted again after kill or power-loss) before its storage or service is touched.
# A destroyed host is never healed: `nats-lab up` creates it again, new and empty.
HEAL_ORDER = ("destroy", "isolate", "cut-routes", "power-loss", "kill", "stale-storage", "stop")
# After these the host is down until `heal` boots it (`up` makes it anew after destroy); how
# `status` and errors put it.
DOWN_KINDS = {"kill": "is killed", "power-loss": "has lost power", "destroy": "is destroyed"}
# `nats-lab fault power-loss all`: the whole site at once.
ALL_HOSTS = "all"
# /dev/fuse (misc major 10, minor 229): whoever holds it open serves a FUSE mount.
FUSE_DEVICE = os.makedev(10, 229)
# NATS's cluster port, cut by cut-routes unless told another.
ROUTE_PORT = 6222
UNIT = "nats-server.service"

Faults = dict[str, dict[str, Any]]


def _path(lab: Lab) -> Path:
    return lab.state / "faults.json"


def load(lab: Lab) -> Faults:
    try:
        data: Faults = json.loads(_path(lab).read_text())
    except (OSError, ValueError):
        return {}
    return data


def save(lab: Lab, faults: Faults) -> None:
    faults = {host: kinds for host, kinds in faults.items() if kinds}
    if not faults:
        _path(lab).unlink(missing_ok=True)
        return
    tmp = _path(lab).with_suffix(".tmp")
    tmp.write_text(json.dumps(faults, indent=2, sort_keys=True) + "\n")
    tmp.replace(_path(lab))


def active(lab: Lab, host: Host) -> list[str]:
    return sorted(load(lab).get(host.name, {}))


def down_kinds(lab: Lab, host: Host) -> list[str]:
    """The active faults that keep HOST down (kill, power-loss)."""
    return [kind for kind in active(lab, host) if kind in DOWN_KINDS]


def isolated_hosts(lab: Lab, faults: Faults) -> list[Host]:
    return [h for h in lab.machines if "isolate" in faults.get(h.name, {})]


def cut_ports(lab: Lab, faults: Faults) -> list[tuple[Host, int]]:
    cut = [h for h in lab.machines if "cut-routes" in faults.get(h.name, {})]
    return [(h, int(faults[h.name]["cut-routes"]["port"])) for h in cut]


def apply_network(lab: Lab, faults: Faults) -> None:
    net.apply_isolation(isolated_hosts(lab, faults), cut_ports(lab, faults))


def run_python(lab: Lab, host: Host, code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a python3 program as root on HOST (fed through stdin)."""
    argv = [*ssh_argv(lab, host), root_command(["python3", "-"])]
    try:
        return subprocess.run(argv, input=code, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 255, "", f"ssh timed out after {timeout}s")


def _remote(lab: Lab, host: Host, script: str, what: str) -> str:
    proc = run_root(lab, host, script)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError(f"{host.name}: {what} failed ({proc.returncode}): {detail}")
    return proc.stdout


def cimnfs_mounts(lab: Lab, host: Host) -> list[str]:
    out = _remote(lab, host, "cat /proc/mounts", "reading /proc/mounts")
    kind = f"fuse.{cimnfs.FSTYPE}"
    return [fields[1] for fields in (line.split() for line in out.splitlines()) if fields[2] == kind]


def recovery(kind: str, host: Host) -> str:
    """The command that brings HOST back from the down fault KIND."""
    return "nats-lab up" if kind == "destroy" else f"nats-lab heal {host.name}"


def _refuse_if_down(host: Host, mine: dict[str, Any]) -> None:
    for down, words in DOWN_KINDS.items():
        if down in mine:
            raise LabError(f"{host.name} {words}; run first: {recovery(down, host)}")


def node_share_dir(lab: Lab, host: Host) -> Path:
    """HOST's JetStream directory on the share: the roles' <mount>/<inventory_hostname>
    (jetstream_storage_node_dir), as the export sees it."""
    return lab.share_dir / host.name


def destroy(lab: Lab, host: Host) -> str:
    """HOST is gone for good: its container is killed if it runs, and its disk (the overlay's
    upper directory, with its identity and keys) and its JetStream directory on the share are
    removed. `heal` leaves it gone; `nats-lab up` creates it again, new and empty."""
    faults = load(lab)
    if "destroy" in faults.get(host.name, {}):
        return f"{host.name} is already destroyed"
    launcher = hosts.launcher_pid(lab, host)
    pid = hosts.init_pid(lab, host)
    # Recorded first, so nothing mistakes the exit for a crash to recover from; other faults on
    # the host end with it.
    faults[host.name] = {"destroy": {}}
    save(lab, faults)
    apply_network(lab, faults)
    if pid is not None:
        kill(pid, signal.SIGKILL)
    if launcher is not None and wait_gone([launcher], 10):
        raise LabError(f"{host.name}: launcher {launcher} still running after the kill")
    hosts.remove_cgroups(host)
    shutil.rmtree(lab.host_dir(host), ignore_errors=True)
    share = node_share_dir(lab, host)
    removed = share.is_dir()
    shutil.rmtree(share, ignore_errors=True)
    stored = f"its JetStream directory {share} removed" if removed else f"no JetStream directory at {share}"
    return f"destroyed {host.name}: container killed, its disk and identity gone, {stored}; `nats-lab up` makes it anew"


def forget_destroyed(lab: Lab) -> list[Host]:
    """Drop the destroy records (for `up`, which then creates those hosts again)."""
    faults = load(lab)
    gone = [host for host in lab.machines if "destroy" in faults.get(host.name, {})]
    for host in gone:
        faults.pop(host.name)
    save(lab, faults)
    return gone


def inject(lab: Lab, kind: str, host: Host, port: int = ROUTE_PORT) -> str:
    """Start fault KIND on HOST (PORT: the one cut-routes cuts); return a one-line description."""
    if kind == "power-loss":
        return power_loss(lab, [host])
    if kind == "destroy":
        return destroy(lab, host)
    faults = load(lab)
    mine = faults.setdefault(host.name, {})
    if kind in mine:
        return f"{kind} on {host.name} is already active"
    _refuse_if_down(host, mine)
    if kind == "stop":
        _remote(lab, host, f"systemctl stop {UNIT}", f"systemctl stop {UNIT}")
        mine[kind] = {}
        message = f"stopped {UNIT} on {host.name}"
    elif kind == "kill":
        pid = hosts.init_pid(lab, host)
        launcher = hosts.launcher_pid(lab, host)
        if pid is None or launcher is None:
            raise LabError(f"{host.name} is not running")
        # Recorded before the kill, so nothing mistakes the exit for a crash to recover from.
        mine[kind] = {"init_pid": pid}
        save(lab, faults)
        kill(pid, signal.SIGKILL)
        if wait_gone([launcher], 10):
            raise LabError(f"{host.name}: launcher {launcher} still running after the kill")
        message = f"killed {host.name} (SIGKILL to its init, pid {pid})"
    elif kind == "isolate":
        mine[kind] = {"veth": host.veth}
        apply_network(lab, faults)
        message = f"isolated {host.name} ({host.veth} dropped in nft {net.NFT_FAMILY} {net.NFT_TABLE})"
    elif kind == "cut-routes":
        # Established routes stall (their packets vanish) and new ones cannot form, while
        # clients, the monitor and SSH still reach the host: a firewall closing the route port.
        mine[kind] = {"port": port}
        apply_network(lab, faults)
        message = f"cut TCP port {port} of {host.name} from the other hosts (nft {net.NFT_FAMILY} {net.NFT_TABLE})"
    elif kind == "stale-storage":
        mounts = cimnfs_mounts(lab, host)
        if not mounts:
            raise LabError(f"{host.name} has no {cimnfs.FSTYPE} mount")
        flags = " ".join(f"'{cimnfs.flag_path(mp)}'" for mp in mounts)
        _remote(lab, host, f"mkdir -p {cimnfs.FLAG_DIR} && touch {flags}", "setting stale flags")
        # The kernel answers stat(2) from its attribute cache for up to attr_timeout (1 s), so a
        # probe right after the touch could still see a healthy mount: return once every mount
        # answers ESTALE, as a client of it then does.
        probes = " ".join(f"'{mp}'" for mp in mounts)
        _remote(
            lab,
            host,
            f"for i in $(seq 50); do stale=1; for mp in {probes}; do "
            f'timeout 2 stat "$mp" 2>&1 | grep -q "Stale file handle" || stale=0; done; '
            f'[ "$stale" = 1 ] && exit 0; sleep 0.1; done; exit 1',
            "waiting for the mounts to answer ESTALE",
        )
        mine[kind] = {"mounts": mounts}
        message = f"storage on {host.name} is stale: {', '.join(mounts)}"
    else:
        raise LabError(f"unknown fault kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    save(lab, faults)
    return message


@dataclass(frozen=True)
class PowerCut:
    """What is killed when HOST loses power, found before anything is touched."""

    host: Host
    init_pid: int
    launcher_pid: int
    fuse_daemons: tuple[int, ...]


def fuse_daemons(host: Host) -> list[int]:
    """The processes in HOST's cgroups that hold /dev/fuse open: its FUSE daemons (mount.cimnfs)."""
    found = []
    for pid in hosts.cgroup_pids(host):
        try:
            entries = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for entry in entries:
            try:
                # readlink asks no file system; stat (through to the open file) only for /dev/fuse,
                # not for files on the FUSE mount, whose stat would be a request to the daemon.
                if os.path.basename(os.readlink(entry)) != "fuse":
                    continue
                st = entry.stat()
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == FUSE_DEVICE:
                found.append(pid)
                break
    return found


def freeze(host: Host, frozen: bool) -> bool:
    """Freeze (or thaw) HOST's whole cgroup v2 tree; False where the kernel offers no cgroup.freeze."""
    for directory in launcher.cgroup_dirs(hosts.cgroup_name(host)):
        control = directory / "cgroup.freeze"
        if control.exists():
            try:
                control.write_text("1\n" if frozen else "0\n")
            except OSError:
                return False
            return True
    return False


def power_loss(lab: Lab, targets: list[Host]) -> str:
    """Cut the power of TARGETS at one instant; return a one-line description.

    A power cut writes nothing back, so the order matters: every target is frozen first
    (cgroup v2 freezer: nothing in it runs on), then every FUSE daemon is SIGKILLed and gone
    (the NFS client's cache, mount.cimnfs's dirty overlay, dies unwritten), and only then
    each container's init (the kernel kills the rest of its PID namespace). Killed the other
    way round, dying processes close their files, and a close flushes on NFS.
    """
    faults = load(lab)
    already = [h for h in targets if any(k in DOWN_KINDS for k in faults.get(h.name, {}))]
    victims = [h for h in targets if h not in already]
    skipped = f" ({', '.join(h.name for h in already)} already down)" if already else ""
    if not victims:
        return f"power-loss: {', '.join(h.name for h in targets)} already down"
    cuts = []
    for host in victims:
        init, parent = hosts.init_pid(lab, host), hosts.launcher_pid(lab, host)
        if init is None or parent is None:
            raise LabError(f"{host.name} is not running")
        cuts.append(PowerCut(host, init, parent, tuple(fuse_daemons(host))))
    at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    site = len(cuts) > 1
    # Recorded before the kill, so nothing mistakes the exit for a crash to recover from.
    for cut in cuts:
        faults.setdefault(cut.host.name, {})["power-loss"] = {
            "init_pid": cut.init_pid,
            "fuse_daemons": list(cut.fuse_daemons),
            "site": site,
            "at": at,
        }
    save(lab, faults)
    frozen: list[Host] = []
    try:
        frozen = [cut.host for cut in cuts if freeze(cut.host, True)]
        daemons = [pid for cut in cuts for pid in cut.fuse_daemons]
        for pid in daemons:
            kill(pid, signal.SIGKILL)
        left = wait_gone(daemons, 10)
        if left:
            raise LabError(f"FUSE daemons {left} still running after SIGKILL; hosts left as they are")
        for cut in cuts:
            kill(cut.init_pid, signal.SIGKILL)
    finally:
        for host in frozen:
            freeze(host, False)
    stuck = wait_gone([cut.launcher_pid for cut in cuts], 15)
    if stuck:
        raise LabError(f"launchers {stuck} still running after the power cut")
    names = ", ".join(cut.host.name for cut in cuts)
    how = "frozen, then " if len(frozen) == len(cuts) else ""
    return (
        f"power cut on {names}{' at once' if site else ''}{skipped}: {how}"
        f"{len(daemons)} FUSE daemon(s) and the host(s) SIGKILLed; unsynced writes on the share are lost"
    )


def _boot_again(lab: Lab, host: Host, base_dir: Path | None, mine: dict[str, Any]) -> str:
    """Start a host that is down (kill, power-loss) as `up` does; it mounts its fstab at boot."""
    if base_dir is None:
        raise LabError(f"cannot restart {host.name}: the lab's base image is unknown")
    hosts.start(lab, host, base_dir)
    result = hosts.wait_booted(lab, host)
    # A boot also cleared the stale flags (in /run) and remounted from fstab.
    mine.pop("stale-storage", None)
    return f"booted again ({result.state}, {result.seconds:.1f}s)"


# Runs on the host as root with PARAMS prepended: what an operator does after a stale handle.
REMOUNT = """
import json, os, subprocess, sys
from urllib.parse import quote


def in_fstab(mp):
    with open("/etc/fstab") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and not fields[0].startswith("#") and fields[1] == mp:
                return True
    return False


failed = False
for mp in PARAMS["mounts"]:
    marker_file = os.path.join(PARAMS["flag_dir"], quote(os.path.normpath(mp), safe="") + ".mount")
    try:
        with open(marker_file) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        marker = None
    subprocess.run(["umount", "-l", mp], check=False)
    if in_fstab(mp):
        argv = ["mount", mp]
    elif marker:
        opts = marker["options"] or "rw"
        argv = ["mount", "-t", PARAMS["fstype"], "-o", opts, marker["source"], mp]
    else:
        print(mp + ": not in fstab and no mount record", file=sys.stderr)
        failed = True
        continue
    if subprocess.run(argv, check=False).returncode == 0:
        print("remounted " + mp)
    else:
        print(mp + ": mount failed", file=sys.stderr)
        failed = True
unit = PARAMS["unit"]
load = subprocess.run(["systemctl", "show", "-p", "LoadState", "--value", unit],
                      capture_output=True, text=True).stdout.strip()
if load == "loaded":
    if subprocess.run(["systemctl", "restart", unit], check=False).returncode == 0:
        print("restarted " + unit)
    else:
        print("restart of " + unit + " failed", file=sys.stderr)
        failed = True
sys.exit(1 if failed else 0)
"""


def _remount_code(mounts: list[str]) -> str:
    params = {"mounts": mounts, "flag_dir": cimnfs.FLAG_DIR, "fstype": cimnfs.FSTYPE, "unit": UNIT}
    return f"PARAMS = {json.dumps(params)}\n{REMOUNT}"


def heal_host(lab: Lab, host: Host, base_dir: Path | None) -> list[str]:
    """Undo every active fault on HOST; return what was done."""
    faults = load(lab)
    mine = faults.get(host.name, {})
    done: list[str] = []
    for kind in HEAL_ORDER:
        if kind not in mine:
            continue
        if kind == "destroy":
            done.append(f"{host.name}: destroyed for good, not healed; `nats-lab up` creates it again, new and empty")
            break
        if kind in ("isolate", "cut-routes"):
            del mine[kind]
            apply_network(lab, faults)
            done.append(f"{host.name}: network restored ({kind})")
        elif kind == "power-loss":
            booted = _boot_again(lab, host, base_dir, mine)
            mounts = cimnfs_mounts(lab, host)
            shares = f"share mounted: {', '.join(mounts)}" if mounts else f"no {cimnfs.FSTYPE} mount"
            del mine[kind]
            done.append(f"{host.name}: power back, {booted}; {shares}")
        elif kind == "kill":
            booted = _boot_again(lab, host, base_dir, mine)
            del mine[kind]
            done.append(f"{host.name}: {booted}")
        elif kind == "stale-storage":
            mounts = list(mine[kind]["mounts"])
            # Someone (the remount runbook) already replaced the stale mounts: only forget the fault.
            if run_root(lab, host, " && ".join(f"timeout 5 stat '{mp}' >/dev/null" for mp in mounts)).returncode == 0:
                del mine[kind]
                done.append(f"{host.name}: storage already fresh")
                save(lab, faults)
                continue
            proc = run_python(lab, host, _remount_code(mounts))
            if proc.returncode != 0:
                raise LabError(f"{host.name}: remount failed: {(proc.stderr or proc.stdout).strip()}")
            del mine[kind]
            done.append(f"{host.name}: storage remounted ({proc.stdout.strip()})")
        elif kind == "stop":
            _remote(lab, host, f"systemctl start {UNIT}", f"systemctl start {UNIT}")
            del mine[kind]
            done.append(f"{host.name}: {UNIT} started")
        save(lab, faults)
    return done


def heal(lab: Lab, targets: list[Host], base_dir: Path | None) -> list[str]:
    # Power comes back for all of them at once: start every host that lost it, then heal in order.
    faults = load(lab)
    if base_dir is not None:
        for host in targets:
            if "power-loss" in faults.get(host.name, {}):
                hosts.start(lab, host, base_dir)
    done: list[str] = []
    for host in targets:
        for line in heal_host(lab, host, base_dir):
            say(line)
            done.append(line)
    return done
