"""pytest plugin (entry point pytest11 `nats_verify`): options, fixtures, a global deadline, the
operator's summary and the exit codes for the checks in verify/checks.

    pytest --pyargs verify.checks --inventory inventory/lab       (or: nats-verify -i inventory/lab)
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import pytest

from verify import monitor
from verify.inventory import Cluster, Node, load_cluster

GROUPS = ("host", "cluster", "security", "eventstore")


class ExitCode(IntEnum):
    """What a run ended with (docs/verify.md). Plain pytest keeps its own codes for the rest."""

    PASSED = 0
    CHECKS_FAILED = 1
    NOT_RUN = 2
    INTERNAL_ERROR = 3
    # Apart from every pytest code (0-6), as timeout(1) reports a command it stopped.
    DEADLINE = 124


EXIT_MEANINGS = {
    ExitCode.PASSED: "every selected check passed",
    ExitCode.CHECKS_FAILED: "the run completed and at least one check failed",
    ExitCode.NOT_RUN: "could not run: inventory refused, bad options, the lab down, no check selected, interrupted",
    ExitCode.INTERNAL_ERROR: "internal error (a bug in verify or pytest)",
    ExitCode.DEADLINE: "stopped at --verify-deadline: some checks not run (the summary and report name them)",
}
# pytest's codes as nats-verify reports them; a usage error is a refusal to run.
FROM_PYTEST: dict[int, ExitCode] = {
    pytest.ExitCode.OK: ExitCode.PASSED,
    pytest.ExitCode.TESTS_FAILED: ExitCode.CHECKS_FAILED,
    pytest.ExitCode.INTERRUPTED: ExitCode.NOT_RUN,
    pytest.ExitCode.INTERNAL_ERROR: ExitCode.INTERNAL_ERROR,
    pytest.ExitCode.USAGE_ERROR: ExitCode.NOT_RUN,
    pytest.ExitCode.NO_TESTS_COLLECTED: ExitCode.NOT_RUN,
}
# The watchdog ends a run this long after its deadline, whatever a check is doing.
WATCHDOG_GRACE_SECONDS = 2.0
NOT_RUN = "not run"


def exit_code(pytest_status: int) -> int:
    """nats-verify's code for what pytest returned (DEADLINE and unknown codes pass through)."""
    return int(FROM_PYTEST.get(pytest_status, pytest_status))


# Each failing check names what to do next; pages live in docs/runbooks/.
RUNBOOKS = {
    "service": "journalctl -u nats-server on the node; start it with playbooks/site.yml (docs/runbooks/README.md)",
    "storage": "stale or missing storage: playbooks/remediate/remount-storage.yml (docs/runbooks/remount-storage.md)",
    "config": "re-run playbooks/site.yml (it validates and rolls the config)",
    "cluster": "JetStream unavailable / quorum: fix the failing nodes first; docs/runbooks/README.md maps symptoms",
    "consumers": "stale consumers: playbooks/remediate/purge-consumers.yml (docs/runbooks/purge-consumers.md)",
    "capacity": "the store is filling: raise the limit before it refuses writes (a stream's max_bytes/max_msgs: "
    "playbooks/streams.yml; the account's or a server's: nats_server_app_jetstream_limits, "
    "nats_server_jetstream_max_*_store, playbooks/site.yml); docs/storage.md",
    "streams": "a declared stream differs: run playbooks/streams.yml (--check --diff shows the change)",
    "eventstore": "event-store operations fail: fix the cluster checks above first",
    "security": "TLS, logins and secrets: docs/security.md; re-run playbooks/site.yml",
    "certificates": "renew the certificates (the lab: playbooks/site.yml reissues them); docs/security.md",
}


@dataclass
class CheckResult:
    nodeid: str
    group: str
    node: str
    outcome: str
    symptom: str
    runbook: str
    seconds: float


@dataclass
class RunState:
    started: float = field(default_factory=time.monotonic)
    deadline: float = 25.0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    results: list[CheckResult] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)
    hosts: dict[str, Any] = field(default_factory=dict)
    # Lines for the report under the summary (account usage, stream table), as `nats` shows them.
    report: list[str] = field(default_factory=list)
    # Problems that do not fail a check yet (a certificate expiring soon), shown in the summary.
    warnings: list[str] = field(default_factory=list)
    # Every selected check (nodeid -> group, node): those without a result did not run.
    selected: dict[str, tuple[str, str]] = field(default_factory=dict)
    # The check started last: without a result yet, it is the one in progress.
    running: str = ""
    # The deadline passed with checks left to run.
    stopped: bool = False
    # The check the watchdog found still running.
    abandoned: str = ""

    def remaining(self) -> float:
        return self.deadline - (time.monotonic() - self.started)

    def not_run(self) -> list[CheckResult]:
        done = {r.nodeid for r in self.results}
        why = f"not run: the {self.deadline:.0f} s deadline of this run passed" if self.stopped else "not run"
        hung = f"stopped: still running {WATCHDOG_GRACE_SECONDS:.0f} s after the {self.deadline:.0f} s deadline"
        return [
            CheckResult(nodeid, group, node, NOT_RUN, hung if nodeid == self.abandoned else why, "", 0)
            for nodeid, (group, node) in self.selected.items()
            if nodeid not in done
        ]

    def verdict(self, pytest_status: int = 0) -> int:
        return ExitCode.DEADLINE if self.stopped else exit_code(pytest_status)


STATE_KEY = pytest.StashKey[RunState]()
CLUSTER_KEY = pytest.StashKey[Cluster]()


# The plugin's options, also listed by `nats-verify --help` (verify/cli.py): (flag, addoption keywords).
OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "--inventory",
        {"default": None, "metavar": "INVENTORY", "help": "Ansible inventory of the cluster (e.g. inventory/lab)"},
    ),
    (
        "--verify-deadline",
        {"type": float, "default": 25.0, "metavar": "SECONDS", "help": "whole-run deadline in seconds (default 25)"},
    ),
    ("--verify-json", {"default": None, "metavar": "FILE", "help": "write a JSON report of every check to this file"}),
    (
        "--max-consumers-per-stream",
        {
            "type": int,
            "default": 200,
            "metavar": "N",
            "help": "more consumers than this on one stream is flagged as stale-consumer build-up (default 200)",
        },
    ),
    (
        "--min-free-bytes",
        {"type": int, "default": 1 << 30, "metavar": "BYTES", "help": "least free space on the share (default 1 GiB)"},
    ),
    (
        "--cert-warn-days",
        {
            "type": int,
            "default": 30,
            "metavar": "DAYS",
            "help": "warn when a server certificate expires within this many days (default 30)",
        },
    ),
    (
        "--deploy-log",
        {
            "action": "append",
            "default": [],
            "metavar": "FILE",
            "help": "an ansible-playbook log (e.g. of a -vvv deploy) that must contain none of the secrets; repeatable",
        },
    ),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nats-verify", "post-deploy checks of a NATS JetStream cluster")
    for flag, keywords in OPTIONS:
        group.addoption(flag, **keywords)


@dataclass
class Output:
    """Where the summary and the JSON report go. The terminal is kept at configure time: while a
    check runs, pytest's capture has fd 1 and 2, and the watchdog must still reach the operator."""

    inventory: str
    json_path: str | None
    stdout: int
    stderr: int
    # Held by the watchdog while it reports, and by unconfigure while it closes the terminal.
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    def close(self) -> None:
        with self.lock:
            self.closed = True
            os.close(self.stdout)
            os.close(self.stderr)

    def summary(self, state: RunState, pytest_status: int = 0) -> list[str]:
        return summary_lines(state, self.inventory, pytest_status)

    def write_json(self, state: RunState, pytest_status: int = 0) -> None:
        if self.json_path:
            Path(self.json_path).write_text(json.dumps(json_report(state, self.inventory, pytest_status), indent=2))


OUTPUT_KEY = pytest.StashKey[Output]()
WATCHDOG_KEY = pytest.StashKey[threading.Timer]()


def pytest_configure(config: pytest.Config) -> None:
    for name in GROUPS:
        config.addinivalue_line("markers", f"{name}: nats-verify {name} checks")
    config.addinivalue_line("markers", "runbook(name): what to do when this check fails")
    if config.getoption("--inventory") is None:
        return
    state = RunState(deadline=config.getoption("--verify-deadline"))
    config.stash[STATE_KEY] = state
    try:
        cluster = load_cluster(config.getoption("--inventory"))
    except (ValueError, OSError) as error:
        raise pytest.UsageError(str(error)) from error
    config.stash[CLUSTER_KEY] = cluster
    bridge = cluster.nodes[0].settings.get("lab_bridge_name")
    if bridge and not Path(f"/sys/class/net/{bridge}").exists():
        # Without the bridge, lab addresses would be routed out of the machine: send nothing.
        raise pytest.UsageError(f"the lab is down (bridge {bridge} absent): run `nats-lab up` first")
    output = Output(str(cluster.inventory), config.getoption("--verify-json"), os.dup(1), os.dup(2))
    config.stash[OUTPUT_KEY] = output
    # Whatever happens (a hung syscall, a stuck thread), the run ends a little after its deadline.
    watchdog = threading.Timer(state.deadline + WATCHDOG_GRACE_SECONDS, _deadline_exceeded, args=(state, output))
    watchdog.daemon = True
    watchdog.start()
    config.stash[WATCHDOG_KEY] = watchdog


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stops the watchdog (a process that runs on, like a test calling cli.main, must not be
    ended by it later) and closes the shared SSH connections rather than leaving them to time out."""
    watchdog = config.stash.get(WATCHDOG_KEY, None)
    if watchdog is not None:
        watchdog.cancel()
    output = config.stash.get(OUTPUT_KEY, None)
    if output is not None:
        output.close()
    cluster = config.stash.get(CLUSTER_KEY, None)
    state = config.stash.get(STATE_KEY, None)
    if cluster is None or state is None:
        return
    for node in cluster.nodes:
        if node.host in state.hosts:
            _, options = node.testinfra_spec()
            subprocess.run(
                ["ssh", "-o", f"ControlPath={options['controlpath']}", "-O", "exit", node.address],
                capture_output=True,
                timeout=5,
                check=False,
            )


def _deadline_exceeded(state: RunState, output: Output) -> None:
    """The watchdog: what finished, what did not, then the process ends (a stuck check cannot be
    interrupted from here)."""
    with output.lock:
        if output.closed:
            return  # the run ended just now, on its own
        # Should the terminal or the report's disk hang too, the process still ends.
        backstop = threading.Timer(WATCHDOG_GRACE_SECONDS, os._exit, args=(ExitCode.DEADLINE,))
        backstop.daemon = True
        backstop.start()
        state.stopped = True
        if state.running not in {r.nodeid for r in state.results}:
            state.abandoned = state.running
        during = f" during {state.abandoned.split('::')[-1]}" if state.abandoned else ""
        _write_all(
            output.stderr, f"\nnats-verify: the run passed its {state.deadline:.0f} s deadline; stopped{during}.\n"
        )
        _write_all(output.stdout, "\n" + "\n".join(output.summary(state)) + "\n")
        try:
            output.write_json(state)
        finally:
            os._exit(ExitCode.DEADLINE)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "nats_node" in metafunc.fixturenames:
        cluster = metafunc.config.stash.get(CLUSTER_KEY, None)
        nodes = list(cluster.nodes) if cluster else []
        metafunc.parametrize("nats_node", nodes, ids=[n.host for n in nodes])


@pytest.fixture(scope="session")
def verify_state(request: pytest.FixtureRequest) -> RunState:
    state = request.config.stash.get(STATE_KEY, None)
    if state is None:
        raise pytest.UsageError("nats-verify needs --inventory INVENTORY")
    return state


@pytest.fixture(scope="session")
def nats_cluster(request: pytest.FixtureRequest, verify_state: RunState) -> Cluster:
    return request.config.stash[CLUSTER_KEY]


@pytest.fixture
def nats_host(nats_node: Node, verify_state: RunState) -> Any:
    """testinfra host for the node, over the inventory's SSH settings. A node that did not answer
    once fails its remaining host checks at once instead of timing out again."""
    import testinfra  # noqa: PLC0415 (import cost only when host checks run)

    key = f"ssh:{nats_node.host}"
    if key in verify_state.unreachable:
        pytest.fail(f"{nats_node.host}: {verify_state.unreachable[key]}", pytrace=False)
    if nats_node.host not in verify_state.hosts:
        # ssh counts whole seconds: 1-3 s, within what is left of the run.
        spec, options = nats_node.testinfra_spec(connect_timeout=min(3, max(1, int(verify_state.remaining()))))
        host = testinfra.get_host(spec, **options)
        try:
            probe = host.run("true")
            failure = "" if probe.rc == 0 else (probe.stderr.strip() or f"rc {probe.rc}")
        except Exception as error:  # testinfra raises on transport failures, with the result inside
            result = error.args[0] if error.args else None
            failure = str(getattr(result, "stderr", "") or error).strip() or type(error).__name__
        if failure:
            verify_state.unreachable[key] = f"unreachable over SSH ({failure})"
            pytest.fail(f"{nats_node.host}: {verify_state.unreachable[key]}", pytrace=False)
        verify_state.hosts[nats_node.host] = host
    return verify_state.hosts[nats_node.host]


def answering_nodes(state: RunState, cluster: Cluster) -> list[Node]:
    """The nodes not already known to be down: their monitor did not answer, or a connection to
    their address timed out, earlier in this run."""
    return [
        n
        for n in cluster.nodes
        if f"monitor:{n.host}" not in state.unreachable and f"silent:{n.address}" not in state.unreachable
    ]


def contact_nodes(state: RunState, cluster: Cluster) -> list[Node]:
    """The nodes worth a connection: those not known to be down; if none is left, those whose
    address did not time out (a refused connection costs nothing, and a client port may answer
    when the monitor does not). None of either: the check fails at once."""
    nodes = answering_nodes(state, cluster)
    nodes = nodes or [n for n in cluster.nodes if f"silent:{n.address}" not in state.unreachable]
    if not nodes:
        pytest.fail("not tried: every node's address timed out earlier in this run", pytrace=False)
    return nodes


def client_urls(state: RunState, cluster: Cluster) -> list[str]:
    """Client URLs of contact_nodes."""
    return [n.client_url for n in contact_nodes(state, cluster)]


def fail_if_silent(state: RunState, node: Node) -> None:
    """Fails at once when a connection to the node's address timed out earlier in this run: an
    address that drops packets (a partition, a dead host) would cost every check its timeout."""
    key = f"silent:{node.address}"
    if key in state.unreachable:
        pytest.fail(f"{node.host}: not tried: {state.unreachable[key]}", pytrace=False)


def note_silence(state: RunState, node: Node, what: str) -> None:
    """Records a connection attempt that timed out (a refusal is an answer, a slow reply too)."""
    state.unreachable.setdefault(f"silent:{node.address}", f"{what} timed out earlier in this run")


def monitor_reply(state: RunState, node: Node, path: str) -> monitor.Reply:
    """A monitor endpoint of the node, any HTTP status; a node whose monitor did not answer once
    fails at once."""
    key = f"monitor:{node.host}"
    if key in state.unreachable:
        pytest.fail(f"{node.host}: {state.unreachable[key]}", pytrace=False)
    fail_if_silent(state, node)
    try:
        return monitor.get(node.monitor_url, path, timeout=min(3.0, max(0.5, state.remaining())))
    except monitor.MonitorUnreachable as error:
        # urllib wraps a timeout while connecting in URLError; one while reading it raises bare.
        if isinstance(getattr(error.__cause__, "reason", None), TimeoutError):
            note_silence(state, node, f"connecting to {node.monitor_url}")
        state.unreachable[key] = f"monitor port not answering ({error})"
        pytest.fail(f"{node.host}: {state.unreachable[key]}", pytrace=False)


def monitor_json(state: RunState, node: Node, path: str) -> Any:
    reply = monitor_reply(state, node, path)
    if reply.status != 200:
        pytest.fail(f"{node.host}: {path} answered HTTP {reply.status}: {reply.body[:200]}", pytrace=False)
    return reply.json


def _describe(item: pytest.Item) -> tuple[str, str]:
    """(group, node) of a check: its marker's group, the node it runs for or "cluster"."""
    group = next((g for g in GROUPS if item.get_closest_marker(g)), "other")
    node = item.callspec.params.get("nats_node") if hasattr(item, "callspec") else None
    return group, node.host if isinstance(node, Node) else "cluster"


def pytest_collection_finish(session: pytest.Session) -> None:
    state = session.config.stash.get(STATE_KEY, None)
    if state is not None:
        state.selected = {item.nodeid: _describe(item) for item in session.items}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    """Past the deadline a check is not started; the summary names it as not run."""
    state = item.config.stash.get(STATE_KEY, None)
    if state is None:
        return None
    if state.remaining() <= 0:
        state.stopped = True
        return True
    state.running = item.nodeid
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    state = item.config.stash.get(STATE_KEY, None)
    if state is not None and (report.when == "call" or (report.when == "setup" and not report.passed)):
        marker = item.get_closest_marker("runbook")
        symptom = ""
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            symptom = (crash.message if crash else str(report.longrepr)).strip().splitlines()[0]
            symptom = symptom.removeprefix("Failed: ").removeprefix("AssertionError: ")
        group, node = _describe(item)
        state.results.append(
            CheckResult(
                nodeid=item.nodeid,
                group=group,
                node=node,
                outcome=report.outcome,
                symptom=symptom,
                runbook=RUNBOOKS.get(marker.args[0], marker.args[0]) if marker else "",
                seconds=round(report.duration, 3),
            )
        )
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(STATE_KEY, None)
    if state is not None and state.stopped:
        session.exitstatus = ExitCode.DEADLINE


def _write_all(fd: int, text: str) -> None:
    data = text.encode()
    while data:
        data = data[os.write(fd, data) :]


def _name(result: CheckResult) -> str:
    return result.nodeid.split("::")[-1]


def result_line(state: RunState, pytest_status: int = 0) -> str:
    """The verdict in words, with the exit code it gives."""
    results = state.results
    code = state.verdict(pytest_status)
    total = len(state.selected) or len(results)
    failed = sum(r.outcome == "failed" for r in results)
    skipped = sum(r.outcome == "skipped" for r in results)
    not_run = len(state.not_run())
    if code == ExitCode.DEADLINE:
        words = f"stopped at the {state.deadline:.0f} s deadline: {not_run} of {total} checks not run, {failed} failed"
    elif code == ExitCode.CHECKS_FAILED:
        words = f"{failed} of {total} checks failed"
    elif code == ExitCode.PASSED:
        words = f"all {total} checks passed" + (f" ({skipped} skipped)" if skipped else "")
    else:
        meaning = EXIT_MEANINGS[ExitCode(code)] if code in set(ExitCode) else f"pytest exit code {code}"
        words = f"{meaning}: {not_run} of {total} checks not run"
    return f"result: {words} (exit {int(code)})"


def summary_lines(state: RunState, inventory: str, pytest_status: int = 0) -> list[str]:
    """The operator's summary: one line per group and node, each failure with what to do next, the
    checks not run, the warnings, the report, the verdict."""
    lines = [f"nats-verify summary ({inventory}, {time.monotonic() - state.started:.1f} s)"]
    by_group: dict[tuple[str, str], list[CheckResult]] = defaultdict(list)
    for result in [*state.results, *state.not_run()]:
        by_group[(result.group, result.node)].append(result)
    for (group, node), results in sorted(by_group.items()):
        failed = [r for r in results if r.outcome == "failed"]
        missing = [r for r in results if r.outcome == NOT_RUN]
        passed = sum(r.outcome == "passed" for r in results)
        status = "FAIL" if failed else "ok" if not missing else "----"
        line = f"  {group:10} {node:10} {status:4} {passed}/{len(results)} checks passed"
        lines.append(line + (f", {len(missing)} not run" if missing else ""))
        for result in failed:
            lines.append(f"      - {_name(result)}: {result.symptom}")
            if result.runbook:
                lines.append(f"        next: {result.runbook}")
        if missing:
            lines.append(f"      not run: {', '.join(_name(r) for r in missing)}")
    if state.warnings:
        lines.append("  warnings:")
        lines += [f"    WARNING {line}" for line in state.warnings]
    if state.report:
        lines.append("  report:")
        lines += [f"    {line}" for line in state.report]
    lines.append(result_line(state, pytest_status))
    return lines


def json_report(state: RunState, inventory: str, pytest_status: int = 0) -> dict[str, Any]:
    checks = [*state.results, *state.not_run()]
    return {
        "inventory": inventory,
        "seconds": round(time.monotonic() - state.started, 3),
        "deadline": state.deadline,
        "deadline_passed": state.stopped,
        "exit_code": int(state.verdict(pytest_status)),
        "result": result_line(state, pytest_status).removeprefix("result: "),
        "passed": sum(r.outcome == "passed" for r in checks),
        "failed": sum(r.outcome == "failed" for r in checks),
        "not_run": sum(r.outcome == NOT_RUN for r in checks),
        "checks": [r.__dict__ for r in checks],
        "report": state.report,
        "warnings": state.warnings,
    }


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(STATE_KEY, None)
    output = config.stash.get(OUTPUT_KEY, None)
    if state is None or output is None or not (state.results or state.selected) or config.option.collectonly:
        return
    terminalreporter.write_line("")
    for line in output.summary(state, exitstatus):
        terminalreporter.write_line(line)
    output.write_json(state, exitstatus)
