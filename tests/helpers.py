"""Paths and small runners shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import nats
import pytest
import yaml

from nats_lab import mirror
from verify import monitor
from verify.inventory import Cluster
from verify.load import BackgroundPublisher, connect

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NATS_SERVER = BIN / "nats-server"
LAB_INVENTORY = REPO / "inventory" / "lab"
# The pinned nats-server release, read from its one home (the shared cluster.yml).
NATS_SERVER_VERSION = mirror.server_version(REPO)
# Certificates for offline tests (rendering, nats-server -t, preflight), issued by the nats_pki
# role into build/ (the `offline_pki` fixture); the lab itself uses .lab/pki.
OFFLINE_PKI = REPO / "build" / "test-pki"
# Passwords for offline tests of inventories that keep theirs in a vault this repo does not have.
OFFLINE_PASSWORDS = {
    "nats_server_app_admin_password": "offline-test-admin-password",
    "nats_server_client_cim_password": "offline-test-cim-password",
    "nats_server_system_password": "offline-test-system-password",
    "nats_server_route_password": "offline-test-route-password",
}


def _load_file(name: str, path: Path, *aliases: str) -> Any:
    """A Python file as a module (plugins/ is no package), registered under its name and the
    aliases (dataclasses, and the modules' `ansible.module_utils` imports, look it up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    for key in (name, *aliases):
        sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


def load_filter_plugin(name: str) -> Any:
    """One of plugins/filter/*.py as a plain module (they are plain Python)."""
    return _load_file(name, REPO / "plugins" / "filter" / f"{name}.py")


def load_module_util(name: str) -> Any:
    """One of plugins/module_utils/*.py, also as `ansible.module_utils.<name>` (how modules import it)."""
    return _load_file(name, REPO / "plugins" / "module_utils" / f"{name}.py", f"ansible.module_utils.{name}")


def missing_in_ci_fails(message: str) -> NoReturn:
    """A test that cannot run here: skipped on a developer's machine, failed in CI (CI=true),
    where everything it needs is installed by the project's own files and nothing may skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def load_plugin_module(name: str) -> Any:
    """One of plugins/modules/*.py as Ansible runs it, its module_utils served from the checkout."""
    for util in sorted(p.stem for p in (REPO / "plugins" / "module_utils").glob("*.py")):
        load_module_util(util)
    return _load_file(name, REPO / "plugins" / "modules" / f"{name}.py")


def offline_vars(directory: Path) -> str:
    """An extra-vars file (for `-e @file`) that gives any inventory the offline certificates and
    passwords, so it renders and passes preflight without its vault or its PKI."""
    path = directory / "offline-vars.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "nats_pki_issue_certificates": False,
                "nats_server_tls_ca_file": str(OFFLINE_PKI / "ca.crt"),
                "nats_server_tls_cert_file": str(OFFLINE_PKI) + "/{{ inventory_hostname }}.crt",
                "nats_server_tls_key_file": str(OFFLINE_PKI) + "/{{ inventory_hostname }}.key",
                **OFFLINE_PASSWORDS,
            }
        )
    )
    return f"@{path}"


PHX_INVENTORY = REPO / "inventory" / "phx"


def ansible_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["ANSIBLE_CONFIG"] = str(REPO / "ansible.cfg")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["ANSIBLE_NOCOLOR"] = "1"
    env.update(extra)
    return env


# A network namespace of its own with only loopback up (it starts down), then the command.
EMPTY_NETWORK = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "offline"]


# Where lab_inventory_copy writes: two levels under the checkout, as the lab inventory is, so its
# inventory_dir-relative paths (the lab's SSH key and PKI) still lead to the checkout's .lab.
LAB_COPIES = REPO / "build"
LAB_COPY_PREFIX = "lab-copy-"
# All a copy may add to the lab inventory: per-host variables that name no address.
LAB_COPY_VARIABLES = frozenset({"nats_server_name"})


def lab_inventory_copy(name: str, host_vars: dict[str, dict[str, Any]]) -> Path:
    """The lab inventory with some hosts' variables changed (a replacement's new server name), for
    a test that must run the playbooks and verify against an inventory the operator has edited.
    Its hosts.yml is the lab's own, so it reaches the lab's addresses and nothing else."""
    unknown = {k for values in host_vars.values() for k in values} - LAB_COPY_VARIABLES
    assert not unknown, f"a lab copy sets only {sorted(LAB_COPY_VARIABLES)}, not {sorted(unknown)}"
    copy = LAB_COPIES / f"{LAB_COPY_PREFIX}{name}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(LAB_INVENTORY, copy, symlinks=False)  # the shared cluster.yml's content, not its link
    (copy / "host_vars").mkdir()
    for host, values in host_vars.items():
        (copy / "host_vars" / f"{host}.yml").write_text(yaml.safe_dump(values, explicit_start=True))
    return copy


def _is_lab_copy(path: Path) -> bool:
    """A directory lab_inventory_copy made: the lab's hosts.yml byte for byte, and host_vars that
    set nothing but LAB_COPY_VARIABLES."""
    if path.parent != LAB_COPIES or not path.name.startswith(LAB_COPY_PREFIX) or not path.is_dir():
        return False
    if (path / "hosts.yml").read_bytes() != (LAB_INVENTORY / "hosts.yml").read_bytes():
        return False
    for host_file in (path / "host_vars").glob("*"):
        values = yaml.safe_load(host_file.read_text()) or {}
        if not isinstance(values, dict) or set(values) - LAB_COPY_VARIABLES:
            return False
    return True


def reaches_hosts(inventory: Path | str) -> bool:
    """Only the lab inventory, or a test's copy of it that keeps its hosts (lab_inventory_copy), may
    reach hosts. Any other inventory directory (phx, a test's own) runs in an empty network: no
    route to 10.0.20.x can exist for it. An inline list like "localhost," stays on this machine's
    loopback (the local test servers)."""
    path = Path(inventory)
    return not path.exists() or path.resolve() == LAB_INVENTORY.resolve() or _is_lab_copy(path.resolve())


def run_playbook(
    playbook: str,
    inventory: Path | str,
    *args: str,
    json_output: bool = False,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Runs ansible-playbook from the repo; with json_output the stdout is the json callback's."""
    extra = {"ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json"} if json_output else {}
    network = [] if reaches_hosts(inventory) else EMPTY_NETWORK
    return subprocess.run(
        [*network, str(BIN / "ansible-playbook"), "-i", str(inventory), str(REPO / "playbooks" / playbook), *args],
        cwd=REPO,
        env=(env or ansible_env()) | extra,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def inventory_vars(inventory: Path) -> dict[str, Any]:
    """`ansible-inventory --list` of an inventory (vars unrendered), as a dict."""
    out = subprocess.run(
        [str(BIN / "ansible-inventory"), "-i", str(inventory), "--list"],
        cwd=REPO,
        env=ansible_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return dict(json.loads(out))


def role_defaults(role: str) -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "roles" / role / "defaults" / "main.yml").read_text()))


def wait_healthy(cluster: Cluster, seconds: float = 90, stable_for: float = 3) -> None:
    """Waits until every node has answered full /healthz with 200 for `stable_for` seconds in a
    row (a healed partition can cost the cluster its meta leader a few seconds later); fails
    naming the others."""
    deadline = time.monotonic() + seconds
    healthy_since: float | None = None
    bridge = cluster.nodes[0].settings.get("lab_bridge_name")
    while True:
        # Without the lab's bridge its addresses route out of the machine: stop before sending.
        if bridge and not Path(f"/sys/class/net/{bridge}").exists():
            raise AssertionError(f"the lab is down (bridge {bridge} absent)")
        states: dict[str, int | str] = {}
        for node in cluster.nodes:
            try:
                reply = monitor.healthz(node.monitor_url, timeout=1)
                # A 503 says why (which stream or consumer is not current): keep it for the failure.
                states[node.host] = reply.status if reply.status == 200 else f"{reply.status} {reply.body.strip()}"
            except monitor.MonitorUnreachable as error:
                states[node.host] = str(error)
        if all(state == 200 for state in states.values()):
            healthy_since = healthy_since or time.monotonic()
            if time.monotonic() - healthy_since >= stable_for:
                return
        else:
            healthy_since = None
        if time.monotonic() > deadline:
            raise AssertionError(f"cluster not healthy after {seconds} s: {states}")
        time.sleep(0.5)


def nats_verify(tmp_path: Path, *args: str, inventory: Path = LAB_INVENTORY) -> tuple[int, dict[str, Any], float, str]:
    report = tmp_path / f"verify-{time.monotonic_ns()}.json"
    start = time.monotonic()
    result = subprocess.run(
        [str(BIN / "nats-verify"), "-i", str(inventory), "--verify-json", str(report), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    elapsed = time.monotonic() - start
    data = json.loads(report.read_text()) if report.exists() else {}
    return result.returncode, data, elapsed, result.stdout + result.stderr


def verify_until_green(
    tmp_path: Path, within: float, inventory: Path = LAB_INVENTORY
) -> tuple[int, dict[str, Any], str, float]:
    """nats-verify again and again until it passes or `within` seconds have gone (a single run
    when 0): what an operator waits after a heal. Returns the last run's code, report and output,
    and the seconds from the first run's start; each failing run's checks are printed."""
    start = time.monotonic()
    while True:
        code, report, _, output = nats_verify(tmp_path, inventory=inventory)
        waited = time.monotonic() - start
        if code == 0 or waited >= within:
            return code, report, output, waited
        print(f"verify still failing after {waited:.1f} s: {failed_checks(report)}")
        time.sleep(1)


def failed_checks(report: dict[str, Any]) -> dict[str, str]:
    return {c["nodeid"].split("::")[-1]: c["symptom"] for c in report.get("checks", []) if c["outcome"] == "failed"}


def nats_lab(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "nats-lab"), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


def on(host: str, command: str, timeout: float = 60) -> str:
    result = nats_lab("ssh", host, "--", command, timeout=timeout)
    assert result.returncode == 0, f"{host}: {command}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def issue_certificates(*extra: str, pki_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """playbooks/certificates.yml (the nats_pki role, on the controller only): into the lab's
    PKI, or with `pki_dir` into that directory whatever the inventory says."""
    if pki_dir is not None:
        extra = (*extra, "-e", "nats_pki_issue_certificates=true", "-e", f"nats_pki_dir={pki_dir}")
    result = run_playbook("certificates.yml", LAB_INVENTORY, *extra, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    return result


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host from ansible-playbook's default output."""
    counts = {}
    for host, fields in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, re.MULTILINE):
        counts[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", fields)}
    return counts


def service_identity(host: str) -> str:
    """Changes whenever nats-server is (re)started: its PID and start time."""
    return on(host, "systemctl show nats-server -p MainPID -p ActiveEnterTimestampMonotonic --value").strip()


def service_identities(cluster: Cluster) -> dict[str, str]:
    return {node.host: service_identity(node.host) for node in cluster.nodes}


# reset-jetstream.yml in cluster mode, confirmed for the lab's cluster.
CLUSTER_RESET = ("-e", "reset_jetstream_scope=cluster", "-e", "reset_jetstream_confirm=phx-cluster")


def delete_stream(cluster: Cluster, name: str) -> None:
    """Deletes a test stream if it is there."""

    async def delete() -> None:
        nc = await connect(cluster, "test-cleanup")
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await nc.jetstream(timeout=10).delete_stream(name)
        finally:
            await nc.close()

    asyncio.run(delete())


def assert_nothing_lost(publisher: BackgroundPublisher) -> None:
    missing, duplicated = publisher.audit()
    tally = publisher.tally
    assert tally.failed == [], f"publishes failed after retries: {tally.failed[:5]} errors={tally.errors}"
    assert missing == [] and duplicated == [], (missing[:5], duplicated[:5])
    assert len(tally.acked) > 50, tally
