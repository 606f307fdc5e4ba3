"""nats-lab: the local 3-host lab for the NATS cluster roles (see `nats-lab --help`)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from nats_lab import faults
from nats_lab import lab as labmod
from nats_lab.config import Lab, LabError, find_repo, load_lab
from nats_lab.ssh import root_command, ssh_argv
from nats_lab.util import locked, require_root, say

DESCRIPTION = """\
Three systemd hosts (systemd-nspawn) on a private bridge, an NFS stand-in share and a
release mirror, laid out as inventory/lab/hosts.yml says."""
FAULT_DESCRIPTION = """\
kinds (`nats-lab heal [HOST]` undoes them; `status` lists the active ones):
  stop           systemctl stop nats-server on HOST
  kill           SIGKILL HOST's init: the host dies at once (heal boots it)
  power-loss     HOST loses power: frozen, its NFS stand-in daemons SIGKILLed first (every
                 write not fsynced or closed is lost, as a real client's cache), then the
                 host; HOST `all` cuts the whole site at one instant. heal boots it again and
                 its fstab mounts the share, as after a real outage
  isolate        drop every packet to and from HOST
  cut-routes     drop HOST's cluster route port (--port) to and from the others
  stale-storage  HOST's cimnfs mounts answer ESTALE (heal: lazy unmount, mount, restart)
  destroy        HOST is gone for good: killed, its disk and identity removed, and its
                 JetStream directory on the share; heal leaves it gone, `nats-lab up` creates
                 it again, new and empty (a replacement at the same name and address)"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nats-lab", description=DESCRIPTION)
    parser.add_argument("--repo", help="the checkout (default: this package's, else cwd's)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("up", help="start the lab (idempotent)")
    sub.add_parser("down", help="stop the lab and remove all its state")
    st = sub.add_parser("status", help="show the lab; exit 1 unless fully up")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    ssh = sub.add_parser("ssh", help="run CMD as root on HOST: nats-lab ssh HOST -- CMD...")
    ssh.add_argument("host")
    ssh.add_argument("cmd", nargs=argparse.REMAINDER, help="command (joined as ssh does)")
    fault = sub.add_parser(
        "fault",
        help="inject a fault: " + ", ".join(faults.KINDS),
        description=FAULT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fault.add_argument("kind", metavar="KIND", help=" | ".join(faults.KINDS))
    fault.add_argument("host", metavar="HOST", help=f"a lab host, or {faults.ALL_HOSTS!r} (power-loss only)")
    fault.add_argument(
        "--port", type=int, default=faults.ROUTE_PORT, help=f"the port cut-routes cuts (default {faults.ROUTE_PORT})"
    )
    heal = sub.add_parser("heal", help="undo active faults on HOST (default: all hosts)")
    heal.add_argument("host", nargs="?", metavar="HOST")
    return parser


def _ssh(lab: Lab, host_name: str, cmd: list[str]) -> int:
    host = lab.host(host_name)
    labmod.require_up(lab, host)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        argv = [*ssh_argv(lab, host, tty=sys.stdin.isatty()), "sudo -n -i"]
    else:
        argv = [*ssh_argv(lab, host), root_command(cmd)]
    return subprocess.call(argv)


def _fault(lab: Lab, kind: str, host_name: str, port: int) -> int:
    if kind not in faults.KINDS:
        raise LabError(f"unknown fault kind {kind!r}; valid kinds: {', '.join(faults.KINDS)}")
    if host_name == faults.ALL_HOSTS:
        if kind != "power-loss":
            raise LabError(f"HOST {faults.ALL_HOSTS!r} is for power-loss only; name one host for {kind}")
        targets = list(lab.hosts)
    else:
        targets = [lab.host(host_name)]
    if kind == "power-loss":
        # Hosts that are down already (kill, power-loss) stay so; the others must be up.
        for host in targets:
            if not faults.down_kinds(lab, host):
                labmod.require_up(lab, host)
        say(faults.power_loss(lab, targets))
        return 0
    # A host that is down already can still be destroyed.
    if kind != "destroy" or not faults.down_kinds(lab, targets[0]):
        labmod.require_up(lab, targets[0])
    say(faults.inject(lab, kind, targets[0], port))
    return 0


def _heal(lab: Lab, host_name: str | None) -> int:
    targets = [lab.host(host_name)] if host_name else list(lab.machines)
    done = faults.heal(lab, targets, labmod.recorded_base(lab))
    if not done:
        say("no active faults: nothing to heal")
    return 0


def _dispatch(lab: Lab, args: argparse.Namespace) -> int:
    if args.command == "status":
        data = labmod.status(lab)
        print(json.dumps(data, indent=2) if args.json else labmod.format_status(data))
        return 0 if data["up"] else 1
    if args.command == "ssh":
        return _ssh(lab, args.host, list(args.cmd))
    require_root()
    # One changing command at a time (a test fixture and a user may both run `up`).
    with locked(lab.state):
        if args.command == "up":
            return labmod.up(lab)
        if args.command == "down":
            return labmod.down(lab)
        if args.command == "fault":
            return _fault(lab, args.kind, args.host, args.port)
        return _heal(lab, args.host)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(load_lab(find_repo(args.repo)), args)
    except LabError as exc:
        print(f"nats-lab: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nats-lab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
