"""Bringing the whole lab up and down, and reporting its state."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from nats_lab import base, faults, hosts, mirror, net
from nats_lab.config import Host, Lab, LabError
from nats_lab.ssh import ensure_key, port_open, run_root
from nats_lab.util import elapsed, kill, require_root, require_tools, say, wait_gone, warn

TOOLS = ("systemd-nspawn", "ip", "nft", "ssh", "ssh-keygen")


def _state_file(lab: Lab) -> Path:
    return lab.state / "state.json"


def recorded_base(lab: Lab) -> Path | None:
    """The base the current hosts were made from (their upper dirs only fit that one)."""
    try:
        path = Path(json.loads(_state_file(lab).read_text())["base"])
    except (OSError, ValueError, KeyError):
        return None
    return path if base.rootfs(path).is_dir() else None


def _pick_base(lab: Lab) -> Path:
    existing = [h for h in lab.machines if hosts.upper_dir(lab, h).exists()]
    current = recorded_base(lab)
    if existing and current is not None:
        return current
    if existing:
        # Upper dirs without their base: start those hosts afresh.
        warn("host state without a known base image: recreating the hosts")
        for host in existing:
            hosts.stop(lab, (host,))
            shutil.rmtree(lab.host_dir(host), ignore_errors=True)
    chosen = base.ensure_base()
    _state_file(lab).write_text(json.dumps({"base": str(chosen)}) + "\n")
    return chosen


def reachable(lab: Lab, host: Host) -> bool:
    if hosts.launcher_pid(lab, host) is None or not port_open(host.address):
        return False
    return run_root(lab, host, "true", timeout=10, connect_timeout=3).returncode == 0


def all_reachable(lab: Lab) -> bool:
    with ThreadPoolExecutor(len(lab.machines)) as pool:
        return all(pool.map(lambda h: reachable(lab, h), lab.machines))


def is_up(lab: Lab) -> bool:
    return net.bridge_exists(lab) and mirror.state(lab).listening and not faults.load(lab) and all_reachable(lab)


def up(lab: Lab) -> int:
    require_root()
    require_tools(*TOOLS)
    if not Path("/dev/fuse").exists():
        raise LabError("/dev/fuse is missing (modprobe fuse): the NFS stand-in needs FUSE")
    ensure_key(lab)
    if is_up(lab):
        say("lab is already up: nothing to do")
        print_summary(lab)
        return 0
    if faults.load(lab) and not net.bridge_exists(lab):
        # Recorded against hosts that are gone (the bridge with them): nothing left to heal.
        say("forgetting faults recorded for a lab that is no longer running")
        faults.save(lab, {})
    for host in faults.forget_destroyed(lab):
        say(f"{host.name} was destroyed: creating it again, new and empty")
    if faults.load(lab):
        say("healing active faults first")
        faults.heal(lab, list(lab.machines), recorded_base(lab))
    base_dir = _pick_base(lab)
    net.ensure_bridge(lab)
    lab.share_dir.mkdir(parents=True, exist_ok=True)
    started = []
    for host in lab.machines:
        hosts.prepare(lab, host, base_dir)
        if hosts.launcher_pid(lab, host) is None:
            hosts.start(lab, host, base_dir)
            started.append(host.name)
    say(f"hosts: started {', '.join(started) or 'none'}; waiting for ssh and boot")
    with ThreadPoolExecutor(len(lab.machines) + 1) as pool:
        mirror_job = pool.submit(mirror.start, lab)
        results = list(pool.map(lambda h: hosts.wait_booted(lab, h), lab.machines))
        mirror_job.result()
    # Only hosts booted now count: a unit the roles broke on a running host is not the lab's.
    degraded = [r for r in results if r.state != "running" and r.host.name in started]
    for r in results:
        failed = f" (failed units: {', '.join(r.failed_units)})" if r.failed_units else ""
        say(f"hosts: {r.host.name} {r.state} after {r.seconds:.1f}s{failed}")
    say(f"mirror: serving {lab.mirror_dir} at {lab.mirror_url}/")
    print_summary(lab)
    if degraded:
        for r in degraded:
            warn(f"{r.host.name} is {r.state}; failed units: {', '.join(r.failed_units) or '?'}")
        return 1
    say(f"lab up in {elapsed():.1f}s")
    return 0


def down(lab: Lab) -> int:
    require_root()
    mirror.stop(lab)
    hosts.stop(lab, lab.machines)
    stray = hosts.stray_nspawn(lab)
    if stray:
        warn(f"stopping nspawn processes without a launcher: {stray}")
        for pid in stray:
            kill(pid, 15)
        for pid in wait_gone(stray, 10):
            kill(pid, 9)
        wait_gone(stray, 2)
        for host in lab.machines:
            hosts.remove_cgroups(host)
    if net.nft_table_exists():
        net.apply_isolation([])
    net.delete_bridge(lab)
    for path in (lab.hosts_dir, lab.share_dir, lab.mirror_dir):
        shutil.rmtree(path, ignore_errors=True)
    for name in ("faults.json", "state.json", "mirror.pid", "mirror.log"):
        (lab.state / name).unlink(missing_ok=True)
    say(f"lab down in {elapsed():.1f}s")
    return 0


STATUS_SCRIPT = (
    "systemctl is-system-running; "
    "systemctl show -p LoadState,ActiveState,SubState --value nats-server.service | paste -sd ' '"
)


def host_status(lab: Lab, host: Host, active_faults: dict[str, Any]) -> dict[str, Any]:
    pid = hosts.init_pid(lab, host)
    info: dict[str, Any] = {
        "name": host.name,
        "address": host.address,
        "running": pid is not None,
        "init_pid": pid,
        "ssh": False,
        "system": None,
        "nats_server": None,
        "faults": sorted(active_faults.get(host.name, {})),
    }
    if pid is None or not port_open(host.address):
        return info
    proc = run_root(lab, host, STATUS_SCRIPT, timeout=10, connect_timeout=3)
    lines = proc.stdout.splitlines()
    if proc.returncode == 255 or len(lines) < 2:
        return info
    info["ssh"] = True
    info["system"] = lines[0].strip()
    load, active, sub = ([*lines[1].split(), "", "", ""])[:3]
    info["nats_server"] = "not-installed" if load != "loaded" else f"{active} ({sub})"
    return info


def status(lab: Lab) -> dict[str, Any]:
    active_faults = faults.load(lab)
    with ThreadPoolExecutor(len(lab.machines)) as pool:
        host_info = list(pool.map(lambda h: host_status(lab, h, active_faults), lab.machines))
    mstate = mirror.state(lab)
    bridge = net.bridge_state(lab)
    isolation = net.nft_table_exists()
    result: dict[str, Any] = {
        "bridge": {"name": lab.bridge, **bridge},
        "mirror": {
            "running": mstate.pid is not None,
            "listening": mstate.listening,
            "url": lab.mirror_url,
        },
        "nft_table": isolation,
        "hosts": host_info,
    }
    result["up"] = bool(bridge["up"] and mstate.listening and all(h["running"] and h["ssh"] for h in host_info))
    return result


def format_status(data: dict[str, Any]) -> str:
    lines = []
    b = data["bridge"]
    bridge_text = f"{b['address']} up" if b["up"] else ("down" if b["exists"] else "absent")
    lines.append(f"bridge  {b['name']}: {bridge_text}")
    m = data["mirror"]
    mirror_text = "serving" if m["listening"] else ("not listening" if m["running"] else "stopped")
    lines.append(f"mirror  {m['url']}/: {mirror_text}")
    header = ("HOST", "ADDRESS", "CONTAINER", "SSH", "SYSTEM", "NATS-SERVER")
    lines.append("{:10} {:14} {:10} {:4} {:10} {:22} FAULTS".format(*header))
    for h in data["hosts"]:
        lines.append(
            f"{h['name']:10} {h['address']:14} {'running' if h['running'] else 'stopped':10} "
            f"{'yes' if h['ssh'] else 'no':4} {h['system'] or '-':10} {h['nats_server'] or '-':22} "
            f"{','.join(h['faults']) or '-'}"
        )
    lines.append("lab is up" if data["up"] else "lab is NOT fully up")
    return "\n".join(lines)


def print_summary(lab: Lab) -> None:
    for host in lab.machines:
        print(f"  {host.name:10} {host.address:14} ssh {lab.ssh_user}@{host.address} -i {lab.ssh_key}")
    print(f"  bridge {lab.bridge} {lab.bridge_address}/{lab.prefix}, mirror {lab.mirror_url}/")


def require_up(lab: Lab, host: Host) -> None:
    if not net.bridge_exists(lab) or hosts.launcher_pid(lab, host) is None:
        for kind in faults.down_kinds(lab, host):
            raise LabError(f"{host.name} {faults.DOWN_KINDS[kind]} (fault); run: {faults.recovery(kind, host)}")
        raise LabError("the lab is not up; run: nats-lab up")
