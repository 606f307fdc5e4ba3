"""pytest plugin (entry point pytest11 `nats_verify`): options, fixtures, a global deadline and the
operator's summary for the checks in verify/checks.

    pytest --pyargs verify --inventory inventory/lab       (or: nats-verify -i inventory/lab)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from verify import monitor
from verify.inventory import Cluster, Node, load_cluster

GROUPS = ("host", "cluster", "security", "eventstore")
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

    def remaining(self) -> float:
        return self.deadline - (time.monotonic() - self.started)


STATE_KEY = pytest.StashKey[RunState]()
CLUSTER_KEY = pytest.StashKey[Cluster]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nats-verify", "post-deploy checks of a NATS JetStream cluster")
    group.addoption("--inventory", default=None, help="Ansible inventory of the cluster (e.g. inventory/lab)")
    group.addoption("--verify-deadline", type=float, default=25.0, help="whole-run deadline in seconds (default 25)")
    group.addoption("--verify-json", default=None, help="write a JSON report of every check to this file")
    group.addoption(
        "--max-consumers-per-stream",
        type=int,
        default=200,
        help="more consumers than this on one stream is flagged as stale-consumer build-up (default 200)",
    )
    group.addoption("--min-free-bytes", type=int, default=1 << 30, help="least free space on the share (default 1 GiB)")
    group.addoption(
        "--cert-warn-days",
        type=int,
        default=30,
        help="warn when a server certificate expires within this many days (default 30)",
    )
    group.addoption(
        "--deploy-log",
        action="append",
        default=[],
        help="an ansible-playbook log (e.g. of a -vvv deploy) that must contain none of the secrets; repeatable",
    )


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
    # Whatever happens (a hung syscall, a stuck thread), the run ends a little after its deadline.
    watchdog = threading.Timer(state.deadline + 5, _deadline_exceeded, args=(state.deadline,))
    watchdog.daemon = True
    watchdog.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    """Closes the shared SSH connections now rather than leaving them to time out."""
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


def _deadline_exceeded(deadline: float) -> None:
    sys.stderr.write(f"\nnats-verify: the run passed its {deadline:.0f} s deadline and was stopped.\n")
    sys.stderr.flush()
    os._exit(3)


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
        spec, options = nats_node.testinfra_spec()
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


def client_urls(state: RunState, cluster: Cluster) -> list[str]:
    """Client URLs of the nodes not already known to be down (all of them if none is left)."""
    return [n.client_url for n in answering_nodes(state, cluster)] or cluster.client_urls


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


def pytest_runtest_setup(item: pytest.Item) -> None:
    state = item.config.stash.get(STATE_KEY, None)
    if state is not None and state.remaining() <= 0:
        pytest.fail(f"not run: the {state.deadline:.0f} s deadline of this run has passed", pytrace=False)


def _group_of(item: pytest.Item) -> str:
    return next((g for g in GROUPS if item.get_closest_marker(g)), "other")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    state = item.config.stash.get(STATE_KEY, None)
    if state is not None and (report.when == "call" or (report.when == "setup" and report.failed)):
        node = item.callspec.params.get("nats_node") if hasattr(item, "callspec") else None
        marker = item.get_closest_marker("runbook")
        symptom = ""
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            symptom = (crash.message if crash else str(report.longrepr)).strip().splitlines()[0]
            symptom = symptom.removeprefix("Failed: ").removeprefix("AssertionError: ")
        state.results.append(
            CheckResult(
                nodeid=item.nodeid,
                group=_group_of(item),
                node=node.host if isinstance(node, Node) else "cluster",
                outcome=report.outcome,
                symptom=symptom,
                runbook=RUNBOOKS.get(marker.args[0], marker.args[0]) if marker else "",
                seconds=round(report.duration, 3),
            )
        )
    return report


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(STATE_KEY, None)
    if state is None or not state.results:
        return
    write = terminalreporter.write_line
    write("")
    write(f"nats-verify summary ({config.getoption('--inventory')}, {time.monotonic() - state.started:.1f} s)")
    by_group: dict[tuple[str, str], list[CheckResult]] = defaultdict(list)
    for result in state.results:
        by_group[(result.group, result.node)].append(result)
    for (group, node), results in sorted(by_group.items()):
        failed = [r for r in results if r.outcome == "failed"]
        passed = sum(r.outcome == "passed" for r in results)
        status = "ok" if not failed else "FAIL"
        write(f"  {group:10} {node:10} {status:4} {passed}/{len(results)} checks passed")
        for result in failed:
            write(f"      - {result.nodeid.split('::')[-1]}: {result.symptom}")
            if result.runbook:
                write(f"        next: {result.runbook}")
    if state.warnings:
        write("  warnings:")
        for line in state.warnings:
            write(f"    WARNING {line}")
    if state.report:
        write("  report:")
        for line in state.report:
            write(f"    {line}")
    path = config.getoption("--verify-json")
    if path:
        Path(path).write_text(
            json.dumps(
                {
                    "inventory": str(config.getoption("--inventory")),
                    "seconds": round(time.monotonic() - state.started, 3),
                    "passed": sum(r.outcome == "passed" for r in state.results),
                    "failed": sum(r.outcome == "failed" for r in state.results),
                    "checks": [r.__dict__ for r in state.results],
                    "report": state.report,
                    "warnings": state.warnings,
                },
                indent=2,
            )
        )
