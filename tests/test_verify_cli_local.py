"""nats-verify as an operator runs it, each run in a network namespace of its own with only
loopback up (`unshare --net`), so no regression can reach a real address:

- inventories it must refuse before any connection (empty path, missing, not an inventory, no
  cluster group, several inventories, the repository root), with listeners on the addresses
  they name to show that nothing was contacted;
- a whole cluster down (refusing, accepting and never speaking, dropping every packet), which
  must end by its deadline with the summary, the JSON report and its exit code;
- the watchdog, when a check hangs past the deadline;
- --help and --version.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import BIN, NATS_SERVER, REPO
from tests.local_nats import free_port
from verify.plugin import WATCHDOG_GRACE_SECONDS, ExitCode

NATS_VERIFY = str(BIN / "nats-verify")
# Brings loopback up in the new namespace (it starts down), then runs the command.
EMPTY_NETWORK = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "verify"]
# ssh reads no user config and asks nothing: a run that gets as far as ssh stays on loopback.
SSH_ARGS = "-F /dev/null -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
SETTINGS = {
    "nats_server_app_admin_password": "admin-password-for-tests",
    "nats_server_system_password": "system-password-for-tests",
    "nats_server_route_password": "route-password-for-tests",
    # One application, so the permission check connects too.
    "nats_server_app_clients": [
        {
            "name": "cim",
            "password": "cim-password-for-tests",
            "streams": ["INFRASTRUCTURE_EVENTS"],
            "publish": ["infrastructure.>"],
        }
    ],
}
# The role defaults: in an empty namespace nothing else listens on them.
NODE_PORTS = (4222, 6222, 8222, 22)
# Where inventory/phx and inventory/lab point: added to loopback in the namespace, with listeners.
REAL_ADDRESSES = ("10.0.20.1", "10.0.20.2", "10.0.20.3", "10.231.20.11", "10.231.20.12", "10.231.20.13")
# Refused inventories are never read this far.
UNREAD_CA = Path("/nonexistent/ca.crt")
# The refusal of `-i ""`.
EMPTY_PATH = "inventory '': empty path (Ansible would read the whole current directory); name one, e.g. inventory/lab"


def write_inventory(
    directory: Path, nodes: dict[str, str], ca_file: Path, group: str = "nats_cluster", vars_dir: bool = True
) -> Path:
    """An inventory like inventory/lab: hosts.yml (name -> address) and group_vars."""
    directory.mkdir(parents=True)
    members = {"hosts": {name: {"ansible_host": address} for name, address in nodes.items()}}
    hosts = {"all": {"vars": {"ansible_ssh_common_args": SSH_ARGS}, "children": {group: members}}}
    (directory / "hosts.yml").write_text(yaml.safe_dump(hosts))
    settings = SETTINGS | {"nats_server_tls_ca_file": str(ca_file)}
    if vars_dir:
        (directory / "group_vars" / group).mkdir(parents=True)
        (directory / "group_vars" / group / "site.yml").write_text(yaml.safe_dump(settings))
    return directory


def endpoints(addresses: Iterable[str], ports: Iterable[int] = NODE_PORTS) -> list[str]:
    return [f"{address}:{port}" for address in addresses for port in ports]


# --- inside the namespace -------------------------------------------------------------------


def _split(end: str) -> tuple[str, int]:
    host, port = end.rsplit(":", 1)
    return host, int(port)


def _keep_quiet(server: socket.socket, end: str, contacted: list[str], held: list[socket.socket]) -> None:
    """Takes every connection and never says a word; notes who was contacted."""
    while True:
        connection, _ = server.accept()
        held.append(connection)
        contacted.append(end)


def _black_hole(end: str) -> list[socket.socket]:
    """A port whose accept queue is full: the kernel drops every further SYN, as a partition does."""
    server = socket.create_server(_split(end), backlog=0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with suppress(BlockingIOError):
            filler.connect(_split(end))
        fillers.append(filler)
    return [server, *fillers]


def _wait_listening(end: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while True:
        with suppress(OSError), socket.create_connection(_split(end), timeout=0.5):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{end} not listening within {seconds} s")
        time.sleep(0.05)


def harness(spec_path: str) -> int:
    """Run inside the empty namespace: listeners and servers up, nats-verify timed, then all down.
    The result (exit code, seconds, endpoints contacted) goes to spec["result"]."""
    spec = json.loads(Path(spec_path).read_text())
    for address in spec["addresses"]:
        subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True)
    contacted: list[str] = []
    held: list[socket.socket] = []
    for end in spec["silent"]:
        server = socket.create_server(_split(end))
        held.append(server)
        threading.Thread(target=_keep_quiet, args=(server, end, contacted, held), daemon=True).start()
    for end in spec["dropping"]:
        held += _black_hole(end)
    servers = [subprocess.Popen([str(NATS_SERVER), "-c", c], stderr=subprocess.DEVNULL) for c in spec["servers"]]
    try:
        for end in spec["ready"]:
            _wait_listening(end)
        env = dict(os.environ)
        if spec["path_first"]:
            env["PATH"] = f"{spec['path_first']}{os.pathsep}{env['PATH']}"
        started = time.monotonic()
        verify = subprocess.Popen(spec["argv"], cwd=spec["cwd"], env=env, start_new_session=True)
        code = verify.wait(timeout=spec["timeout"])
        seconds = time.monotonic() - started
        # What the run left behind (a hung ssh the watchdog abandoned): its own process group.
        with suppress(ProcessLookupError):
            os.killpg(verify.pid, signal.SIGKILL)
    finally:
        for process in servers:
            process.terminate()
            process.wait(10)
    Path(spec["result"]).write_text(json.dumps({"code": code, "seconds": seconds, "contacted": contacted}))
    return 0


# --- from the test --------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    code: int
    seconds: float
    contacted: list[str]
    stdout: str
    stderr: str
    report: dict[str, Any]

    @property
    def summary(self) -> list[str]:
        lines = self.stdout.splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("nats-verify summary (")), len(lines))
        end = next((i for i, line in enumerate(lines) if line.startswith("result: ")), len(lines) - 1)
        return lines[start : end + 1]


def nats_verify(
    tmp_path: Path,
    *args: str,
    cwd: Path | None = None,
    silent: Iterable[str] = (),
    dropping: Iterable[str] = (),
    servers: Iterable[Path] = (),
    ready: Iterable[str] = (),
    addresses: Iterable[str] = (),
    path_first: Path | None = None,
    command: Iterable[str] = (NATS_VERIFY,),
) -> Run:
    """nats-verify ARGS in an empty network namespace, with listeners that take connections and
    never answer (`silent`), ports that drop every packet (`dropping`) and real nats-servers."""
    run_dir = tmp_path / f"run-{time.monotonic_ns()}"
    run_dir.mkdir()
    spec = {
        "argv": [*command, *args],
        "cwd": str(cwd or tmp_path),
        "silent": list(silent),
        "dropping": list(dropping),
        "servers": [str(s) for s in servers],
        "ready": list(ready),
        "addresses": list(addresses),
        "path_first": str(path_first) if path_first else "",
        "timeout": 60,
        "result": str(run_dir / "result.json"),
    }
    (run_dir / "spec.json").write_text(json.dumps(spec))
    entry = "import sys; from tests.test_verify_cli_local import harness; sys.exit(harness(sys.argv[1]))"
    finished = subprocess.run(
        [*EMPTY_NETWORK, sys.executable, "-c", entry, str(run_dir / "spec.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    report_path = next((Path(a.split("=", 1)[-1]) for a in args if a.startswith("--verify-json=")), None)
    report = json.loads(report_path.read_text()) if report_path and report_path.exists() else {}
    return Run(result["code"], result["seconds"], result["contacted"], finished.stdout, finished.stderr, report)


def assert_refused(run: Run, message: str) -> None:
    """Refused as nats-verify refuses: one line, exit code 2, nothing contacted."""
    assert (run.code, run.stderr.strip(), run.stdout) == (ExitCode.NOT_RUN, f"ERROR: {message}", "")
    assert run.contacted == []


# --- refusals -------------------------------------------------------------------------------


@pytest.fixture
def two_inventories(tmp_path: Path) -> Path:
    """A directory holding two inventories of the same hosts at different loopback addresses."""
    parent = tmp_path / "inventories"
    write_inventory(parent / "a", {"nats-1": "127.0.0.11", "nats-2": "127.0.0.12"}, UNREAD_CA)
    write_inventory(parent / "b", {"nats-1": "127.0.0.21", "nats-2": "127.0.0.22"}, UNREAD_CA)
    return parent


TRIPWIRES = endpoints(["127.0.0.11", "127.0.0.12", "127.0.0.21", "127.0.0.22"])


def test_empty_inventory_path_is_refused(tmp_path: Path, two_inventories: Path) -> None:
    """`-i ""` would read the current directory: here one holding two inventories."""
    run = nats_verify(tmp_path, "-i", "", cwd=two_inventories, silent=TRIPWIRES)
    assert_refused(run, EMPTY_PATH)


def _given(tmp_path: Path, kind: str) -> Path:
    """An inventory path that is not one."""
    if kind == "missing":
        return tmp_path / "inventory" / "phx"
    if kind == "device":
        return Path("/dev/null")
    if kind == "empty-file":
        (tmp_path / "hosts.yml").touch()
        return tmp_path / "hosts.yml"
    if kind == "empty-directory":
        (tmp_path / "inventory" / "group_vars").mkdir(parents=True)  # nothing Ansible reads as hosts
        return tmp_path / "inventory"
    return REPO / "playbooks" / "site.yml"  # a playbook given for the inventory


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("missing", "does not exist"),
        ("device", "neither a directory nor a file"),
        ("empty-file", "empty file"),
        ("empty-directory", "empty (no file Ansible would read in it)"),
        ("playbook", "not an inventory Ansible can read"),
    ],
)
def test_path_that_is_no_inventory_is_refused(tmp_path: Path, kind: str, problem: str) -> None:
    given = _given(tmp_path, kind)
    assert_refused(nats_verify(tmp_path, "-i", str(given)), f"inventory {given}: {problem}")


def test_inventory_without_the_cluster_group_is_refused(tmp_path: Path) -> None:
    other = write_inventory(tmp_path / "web", {"web-1": "127.0.0.11"}, UNREAD_CA, group="web")
    run = nats_verify(tmp_path, "-i", str(other), silent=TRIPWIRES)
    assert_refused(run, f"inventory {other}: no hosts in group 'nats_cluster'")


@pytest.mark.parametrize("vars_dir", [True, False], ids=["with-group-vars", "hosts-files-only"])
def test_directory_of_two_inventories_is_refused(tmp_path: Path, vars_dir: bool) -> None:
    """Ansible merges them (the last address wins). Found by their group_vars before Ansible reads
    anything, or, with hosts files only, by where the cluster's hosts come from."""
    parent = tmp_path / "inventories"
    write_inventory(parent / "a", {"nats-1": "127.0.0.11", "nats-2": "127.0.0.12"}, UNREAD_CA, vars_dir=vars_dir)
    write_inventory(parent / "b", {"nats-1": "127.0.0.21", "nats-2": "127.0.0.22"}, UNREAD_CA, vars_dir=vars_dir)
    run = nats_verify(tmp_path, "-i", str(parent), silent=TRIPWIRES)
    assert_refused(run, f"inventory {parent}: holds several inventories (a, b); name one of them")


def test_one_inventory_in_several_files_is_accepted_unless_addresses_differ(tmp_path: Path) -> None:
    """Two files in one inventory directory are one inventory; the same host at two addresses in
    them is not."""
    inventory = write_inventory(tmp_path / "one", {"nats-1": "127.0.0.11"}, UNREAD_CA)
    (inventory / "more.yml").write_text(yaml.safe_dump({"all": {"hosts": {"nats-1": {"ansible_host": "127.0.0.21"}}}}))
    run = nats_verify(tmp_path, "-i", str(inventory), "--collect-only", silent=TRIPWIRES)
    assert_refused(
        run,
        f"inventory {inventory}: nats-1 has more than one address (127.0.0.11 in hosts.yml, 127.0.0.21 in more.yml)",
    )
    (inventory / "more.yml").write_text(yaml.safe_dump({"all": {"hosts": {"nats-1": {"nats_server_user": "nats"}}}}))
    run = nats_verify(tmp_path, "-i", str(inventory), "--collect-only", silent=TRIPWIRES)
    assert run.code == ExitCode.PASSED, run.stdout + run.stderr
    assert run.contacted == []


@pytest.mark.parametrize("given", ["", ".", "inventory"])
def test_repository_root_and_inventory_directory_are_refused(tmp_path: Path, given: str) -> None:
    """The dangerous one: from the checkout, `-i ""` merged inventory/phx and inventory/lab and
    aimed at 10.0.20.1-3. Those addresses listen in the namespace here: none may be contacted."""
    run = nats_verify(tmp_path, "-i", given, cwd=REPO, addresses=REAL_ADDRESSES, silent=endpoints(REAL_ADDRESSES))
    named = {"": "''", ".": str(REPO), "inventory": str(REPO / "inventory")}[given]
    if given:
        inventories = "inventory/lab, inventory/phx" if given == "." else "lab, phx"
        assert_refused(run, f"inventory {named}: holds several inventories ({inventories}); name one of them")
    else:
        assert_refused(run, EMPTY_PATH)


def test_plain_pytest_refuses_too(tmp_path: Path) -> None:
    """The plugin refuses for `pytest --pyargs verify.checks` as well (pytest's usage error, 4)."""
    run = nats_verify(
        tmp_path,
        "--pyargs",
        "verify.checks",
        "-p",
        "no:cacheprovider",
        "--inventory",
        "",
        command=[str(BIN / "pytest")],
    )
    assert run.code == pytest.ExitCode.USAGE_ERROR
    assert "ERROR: inventory '': empty path" in run.stderr


# --- a whole cluster down -------------------------------------------------------------------


DOWN = {"down-1": "127.0.0.11", "down-2": "127.0.0.12", "down-3": "127.0.0.13"}


@dataclass(frozen=True)
class Outage:
    name: str
    select: str
    deadline: float
    code: int


OUTAGES = [
    # Nothing listens: every connection refused at once.
    Outage("refused", "", 8, ExitCode.CHECKS_FAILED),
    # Every port takes the connection and never says a word (a hung server).
    Outage("silent", "not host", 8, ExitCode.CHECKS_FAILED),
    # Every SYN dropped (a partition, a dead host).
    Outage("dropping", "not host", 8, ExitCode.CHECKS_FAILED),
    # Silent SSH too: three SSH timeouts do not fit in 5 s; the checks left are not run.
    Outage("silent", "", 5, ExitCode.DEADLINE),
]


@pytest.mark.slow
@pytest.mark.parametrize("outage", OUTAGES, ids=[f"{o.name}-{o.select or 'all'}-{o.deadline:.0f}s" for o in OUTAGES])
def test_whole_cluster_down_ends_by_its_deadline_with_summary_and_report(
    tmp_path: Path, offline_pki: Path, outage: Outage
) -> None:
    inventory = write_inventory(tmp_path / "down", DOWN, offline_pki / "ca.crt")
    report = tmp_path / "report.json"
    args = ["-i", str(inventory), f"--verify-json={report}", "--verify-deadline", str(outage.deadline)]
    ends = endpoints(DOWN.values())
    run = nats_verify(
        tmp_path,
        *args,
        *(["-m", outage.select] if outage.select else []),
        silent=ends if outage.name == "silent" else (),
        dropping=ends if outage.name == "dropping" else (),
    )
    print(f"{outage}: {run.seconds:.1f} s, exit {run.code}")
    assert run.code == outage.code, run.stdout[-3000:] + run.stderr[-2000:]
    assert run.seconds < outage.deadline + 3
    assert set(run.contacted) <= set(ends)
    summary = run.summary
    assert summary[0].startswith(f"nats-verify summary ({inventory}, "), run.stdout[-3000:]
    assert summary[-1].endswith(f"(exit {outage.code})")
    data = run.report
    assert data["exit_code"] == outage.code and data["result"] == summary[-1].removeprefix("result: ")
    outcomes = {c["outcome"] for c in data["checks"]}
    if outage.code == ExitCode.DEADLINE:
        assert data["deadline_passed"] and data["not_run"] > 0
        assert "not run" in outcomes
        assert summary[-1].startswith(f"result: stopped at the {outage.deadline:.0f} s deadline: {data['not_run']} of ")
        first = next(c for c in data["checks"] if c["outcome"] == "not run")
        assert any(line.strip().startswith("not run: ") and first["nodeid"].split("::")[-1] in line for line in summary)
    else:
        assert not data["deadline_passed"] and data["not_run"] == 0
        assert data["seconds"] < outage.deadline
        assert summary[-1] == f"result: {data['failed']} of {len(data['checks'])} checks failed (exit 1)"
    # Nothing answered: nothing passes, and the login checks did not wait for an answer.
    assert [c["nodeid"] for c in data["checks"] if c["outcome"] == "passed"] == []
    logins = [c for c in data["checks"] if c["nodeid"].endswith(("anonymous_client_refused", "password_refused"))]
    assert all(c["seconds"] < 3 for c in logins), logins


@pytest.mark.slow
def test_watchdog_ends_a_hung_check_with_summary_and_report(tmp_path: Path, offline_pki: Path) -> None:
    """An ssh that never returns (a host frozen mid-command): the watchdog ends the run 2 s after
    the deadline, with the summary, the report, the hung check named, and the deadline's code."""
    hung = tmp_path / "hung-ssh"
    hung.mkdir()
    (hung / "ssh").write_text("#!/bin/sh\nexec sleep 30\n")
    (hung / "ssh").chmod(0o755)
    inventory = write_inventory(tmp_path / "down", DOWN, offline_pki / "ca.crt")
    report = tmp_path / "report.json"
    deadline = 2.0
    run = nats_verify(
        tmp_path,
        "-i",
        str(inventory),
        f"--verify-json={report}",
        "--verify-deadline",
        str(deadline),
        "-m",
        "host",
        path_first=hung,
    )
    print(f"watchdog: {run.seconds:.1f} s, exit {run.code}")
    assert run.code == ExitCode.DEADLINE, run.stdout + run.stderr
    assert deadline + WATCHDOG_GRACE_SECONDS - 0.5 < run.seconds < deadline + WATCHDOG_GRACE_SECONDS + 2
    assert (
        "nats-verify: the run passed its 2 s deadline; stopped during test_service_active_and_enabled[down-1]."
        in run.stderr
    )
    summary = run.summary
    data = run.report
    total = len(data["checks"])
    assert summary[-1] == f"result: stopped at the 2 s deadline: {total} of {total} checks not run, 0 failed (exit 124)"
    assert data["exit_code"] == ExitCode.DEADLINE and data["deadline_passed"]
    stopped = [c for c in data["checks"] if c["symptom"].startswith("stopped")]
    assert [c["nodeid"] for c in stopped] == ["test_host.py::test_service_active_and_enabled[down-1]"]
    assert {c["outcome"] for c in data["checks"]} == {"not run"}


# --- a node that answers --------------------------------------------------------------------


def test_login_checks_pass_past_a_refusing_node(tmp_path: Path, offline_pki: Path) -> None:
    """The login checks skip a node that refuses and judge the first that answers: a real
    nats-server with TLS (its certificate names 127.0.0.1) refusing both logins."""
    port = free_port()
    admin_password = SETTINGS["nats_server_app_admin_password"]
    config = tmp_path / "nats.conf"
    config.write_text(
        f'listen: "127.0.0.1:{port}"\n'
        f'tls {{ cert_file: "{offline_pki}/nats-1.crt", key_file: "{offline_pki}/nats-1.key" }}\n'
        f"accounts {{ APP {{ users: [{{ user: admin, password: {json.dumps(admin_password)} }}] }} }}\n"
    )
    inventory = write_inventory(
        tmp_path / "half", {"gone-1": "127.0.0.2", "nats-1": "127.0.0.1"}, offline_pki / "ca.crt"
    )
    (inventory / "group_vars" / "nats_cluster" / "ports.yml").write_text(
        yaml.safe_dump({"nats_server_client_port": port})
    )
    report = tmp_path / "report.json"
    run = nats_verify(
        tmp_path,
        "-i",
        str(inventory),
        f"--verify-json={report}",
        "-k",
        "anonymous_client_refused or wrong_password_refused",
        servers=[config],
        ready=[f"127.0.0.1:{port}"],
    )
    assert run.code == ExitCode.PASSED, run.stdout + run.stderr
    assert {c["nodeid"].split("::")[-1]: c["outcome"] for c in run.report["checks"]} == {
        "test_anonymous_client_refused": "passed",
        "test_wrong_password_refused": "passed",
    }
    assert run.summary[-1] == "result: all 2 checks passed (exit 0)"


# --- help and version -----------------------------------------------------------------------


def test_help_lists_the_options_and_exit_codes(tmp_path: Path) -> None:
    run = nats_verify(tmp_path, "--help")
    assert run.code == 0, run.stderr
    for option in (
        "-i INVENTORY",
        "--verify-json FILE",
        "--verify-deadline SECONDS",
        "--cert-warn-days DAYS",
        "--max-consumers-per-stream N",
        "--min-free-bytes BYTES",
        "--deploy-log FILE",
        "-m EXPR",
        "-k EXPR",
        "--junitxml FILE",
        "--version",
    ):
        assert option in run.stdout, option
    for code in ExitCode:
        assert f"\n  {int(code):3}  " in run.stdout, code


def test_version_is_the_package_version(tmp_path: Path) -> None:
    run = nats_verify(tmp_path, "--version")
    assert (run.code, run.stdout) == (0, f"nats-verify {metadata.version('cim-nats-infra')}\n")


def test_options_reach_pytest(tmp_path: Path, offline_pki: Path) -> None:
    """What --help lists is passed on: a deadline, a selection and the JUnit report."""
    inventory = write_inventory(tmp_path / "down", DOWN, offline_pki / "ca.crt")
    junit = tmp_path / "junit.xml"
    report = tmp_path / "report.json"
    run = nats_verify(
        tmp_path,
        "-i",
        str(inventory),
        f"--verify-json={report}",
        "--verify-deadline",
        "7",
        "-m",
        "cluster",
        "-k",
        "healthz",
        "--junitxml",
        str(junit),
    )
    assert run.code == ExitCode.CHECKS_FAILED, run.stdout + run.stderr
    assert run.report["deadline"] == 7.0
    assert sorted(c["nodeid"] for c in run.report["checks"]) == [
        f"test_cluster.py::test_full_healthz[{h}]" for h in DOWN
    ]
    assert junit.read_text().count("<testcase ") == 3
