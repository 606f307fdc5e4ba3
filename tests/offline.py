"""Playbook runs that cannot reach any host: for the offline tests (preflight, render, bundles).

Two walls, so a refusal that regressed still sends nothing:
- the run has a network namespace of its own with only loopback up (`unshare --net`): no route
  to 10.0.20.x, the lab, or anywhere else exists for it;
- ssh is a recorder that refuses every call (exit 255), so even a connection over loopback is
  never made, and the test sees each attempt.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import BIN, EMPTY_NETWORK, LAB_INVENTORY, REPO, ansible_env

REFUSING_SSH = """#!/bin/sh
echo "$@" >> {log}
echo "offline test: ssh refused ($*)" >&2
exit 255
"""


@dataclass(frozen=True)
class OfflineRun:
    result: subprocess.CompletedProcess[str]
    ssh_log: Path

    @property
    def output(self) -> str:
        return self.result.stdout + self.result.stderr

    @property
    def ssh_calls(self) -> list[str]:
        return self.ssh_log.read_text().splitlines()


def refusing_ssh(tmp_path: Path) -> tuple[Path, Path]:
    """(the refusing ssh executable, the log of its calls)."""
    log = tmp_path / "ssh-calls.log"
    log.touch()
    refuser = tmp_path / "ssh-refuser"
    refuser.write_text(REFUSING_SSH.format(log=log))
    refuser.chmod(0o755)
    return refuser, log


def run_offline(argv: list[str], tmp_path: Path, timeout: float = 180, **env: str) -> OfflineRun:
    """Any command (ansible-playbook, nats-verify...) in an empty network with the refusing ssh."""
    refuser, log = refusing_ssh(tmp_path)
    result = subprocess.run(
        [*EMPTY_NETWORK, *argv],
        cwd=REPO,
        env=ansible_env(ANSIBLE_SSH_EXECUTABLE=str(refuser), **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return OfflineRun(result, log)


def run_offline_playbook(
    playbook: str, inventory: Path | str, *args: str, tmp_path: Path, timeout: float = 180, **env: str
) -> OfflineRun:
    argv = [str(BIN / "ansible-playbook"), "-i", str(inventory), str(REPO / "playbooks" / playbook), *args]
    return run_offline(argv, tmp_path, timeout, **env)


# A web server for the run's own empty network: its loopback is the only address there, so the
# server is started inside it, in a thread beside the command (the namespace is new: the port is
# free). It serves `directory` and logs each request's path, one a line, to `log`.
SERVE_THEN_RUN = """
import functools, http.server, subprocess, sys, threading
directory, port, log, *command = sys.argv[1:]

class Handler(http.server.SimpleHTTPRequestHandler):
    def log_request(self, code="-", size="-"):
        with open(log, "a") as requests:
            requests.write(self.path + "\\n")

    def log_message(self, format, *args):
        pass  # the command's output stays its own

server = http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), functools.partial(Handler, directory=directory))
threading.Thread(target=server.serve_forever, daemon=True).start()
sys.exit(subprocess.run(command).returncode)
"""
LOCAL_WEB_PORT = 8000
LOCAL_WEB_URL = f"http://127.0.0.1:{LOCAL_WEB_PORT}"


def run_offline_serving(
    directory: Path, requests_log: Path, argv: list[str], tmp_path: Path, timeout: float = 180, **env: str
) -> OfflineRun:
    """run_offline with `directory` served at LOCAL_WEB_URL inside its network (nothing else answers)."""
    requests_log.touch()
    serving = [sys.executable, "-c", SERVE_THEN_RUN, str(directory), str(LOCAL_WEB_PORT), str(requests_log)]
    return run_offline([*serving, *argv], tmp_path, timeout, **env)


def make_inventory(tmp_path: Path, change: dict[str, Any]) -> Path:
    """A copy of the lab inventory with one change:
    {"host_vars": {host: {...}}}, {"group_vars": {...}}, {"drop_hosts": n}, {"add_host": {...}},
    {"rename_host": (old, new)}."""
    inventory = tmp_path / "inventory"
    shutil.copytree(LAB_INVENTORY, inventory, symlinks=False)
    hosts_file = inventory / "hosts.yml"
    hosts = yaml.safe_load(hosts_file.read_text())
    # No lab-is-up guard: these runs must not depend on the lab (and never reach a host).
    hosts["all"]["vars"].pop("lab_bridge_name")
    members = hosts["all"]["children"]["nats_cluster"]["hosts"]
    for _ in range(change.get("drop_hosts", 0)):
        members.pop(sorted(members)[-1])
    if "add_host" in change:
        members["nats-4"] = change["add_host"]
    if "rename_host" in change:
        old, new = change["rename_host"]
        members[new] = members.pop(old)
    hosts_file.write_text(yaml.safe_dump(hosts))
    for host, values in change.get("host_vars", {}).items():
        (inventory / "host_vars").mkdir(exist_ok=True)
        (inventory / "host_vars" / f"{host}.yml").write_text(yaml.safe_dump(values))
    if "group_vars" in change:
        (inventory / "group_vars" / "nats_cluster" / "zz_broken.yml").write_text(yaml.safe_dump(change["group_vars"]))
    return inventory


# What an operator must never have to read in a refusal.
NOT_A_MESSAGE = (
    "Traceback",
    "argument_spec_data",
    "validate_args_context",
    "has no attribute",
    "AnsibleUndefined",
    "jinja2.",
    "object of type",
)
LONGEST_PROBLEM = 320


def refusal_text(output: str) -> str:
    """The failure lines of a run: Ansible's `fatal:`/`ERROR` lines and what follows them."""
    lines = output.splitlines()
    keep = [i for i, line in enumerate(lines) if line.startswith(("fatal:", "ERROR", "[ERROR]", "failed:"))]
    return "\n".join(lines[i] for i in keep)


def assert_one_short_refusal(output: str) -> None:
    """A refusal is short and plain: each problem one clause, no dump, no traceback, no internals."""
    text = refusal_text(output)
    assert text, f"no refusal line in:\n{output[-3000:]}"
    for bad in NOT_A_MESSAGE:
        assert bad not in output, f"the refusal shows {bad!r}:\n{text[:3000]}"
    problems = [p for line in text.splitlines() for p in line.split(" | ")]
    too_long = [p for p in problems if len(p) > LONGEST_PROBLEM + 200]
    assert not too_long, f"a refusal of {max(len(p) for p in too_long)} characters:\n{too_long[0][:2000]}"
