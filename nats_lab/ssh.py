"""ssh to the lab hosts as the inventory does (user, key and options from hosts.yml)."""

from __future__ import annotations

import shlex
import socket
import subprocess
from pathlib import Path

from nats_lab.config import Host, Lab
from nats_lab.util import run, say


def ensure_key(lab: Lab) -> Path:
    """The lab's client key, made once and kept across `down` (it is not host state)."""
    if not lab.ssh_key.exists():
        lab.ssh_key.parent.mkdir(parents=True, exist_ok=True)
        lab.ssh_key.parent.chmod(0o700)
        say(f"ssh: generating {lab.ssh_key}")
        run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "nats-lab",
                "-f",
                str(lab.ssh_key),
            ]
        )
    return lab.ssh_key


def ssh_argv(lab: Lab, host: Host, *, connect_timeout: int = 5, tty: bool = False) -> list[str]:
    argv = ["ssh", "-i", str(lab.ssh_key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"]
    argv += ["-o", f"ConnectTimeout={connect_timeout}", *lab.ssh_common_args]
    argv += ["-tt"] if tty else ["-T"]
    return [*argv, "-l", lab.ssh_user, host.address]


def root_command(command: list[str]) -> str:
    """The remote command line: CMD run by root through sudo, with ssh's word-joining rules.

    ssh joins its arguments with spaces for the remote shell; doing the same keeps
    `nats-lab ssh H -- 'a | b'` and `nats-lab ssh H -- ls -l /` both working as with ssh.
    """
    script = " ".join(command)
    return "sudo -n -- sh -c " + shlex.quote(script)


def run_root(
    lab: Lab, host: Host, script: str, *, timeout: float = 60, connect_timeout: int = 5
) -> subprocess.CompletedProcess[str]:
    """Run SCRIPT as root on HOST and capture its output (does not raise on failure)."""
    argv = [*ssh_argv(lab, host, connect_timeout=connect_timeout), root_command([script])]
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(argv, 255, "", f"ssh timed out after {exc.timeout}s")


def port_open(address: str, port: int = 22, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False
