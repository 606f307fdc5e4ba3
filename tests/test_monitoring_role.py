"""The nats_monitoring role's Prometheus config: rendered offline for the lab and phx inventories
it names every member's exporter with its `node` and `cluster` labels and passes `promtool check
config`; its preflight refuses bad settings in one short line before any host is touched; and
Debian's Prometheus really loads it, with every alert of the rules file, and re-reads it on SIGHUP.

Offline (tests/offline.py: an empty network and an ssh that refuses and records). Rendering runs
for the inventory's own monitoring host (the lab's), or one of the test's where it has none (phx),
over a local connection into tmp_path only; the Prometheus started here listens on 127.0.0.1 and
its targets are loopback ports where nothing listens. promtool and prometheus are Debian 12's (package
prometheus); without them those tests skip, and fail with CI=true.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import BIN, LAB_INVENTORY, PHX_INVENTORY, REPO, inventory_vars, missing_in_ci_fails
from tests.local_nats import free_port
from tests.offline import OfflineRun, assert_one_short_refusal, make_inventory, run_offline, run_offline_playbook

ROLE = REPO / "roles" / "nats_monitoring"
RULES = ROLE / "files" / "nats-alerts.rules.yml"
INSTALLED_RULES = "/etc/prometheus/rules/nats-alerts.rules.yml"
# The test's monitoring host where an inventory has none: TEST-NET-1, only ever a name in a
# rendered file or a refused ssh call.
MONITORING_HOST = "prometheus-1"
MONITORING_ADDRESS = "192.0.2.10"
INVENTORIES = {"lab": LAB_INVENTORY, "phx": PHX_INVENTORY}
EXPORTERS = {
    "lab": ["10.231.20.11:7777", "10.231.20.12:7777", "10.231.20.13:7777"],
    "phx": ["10.0.20.1:7777", "10.0.20.2:7777", "10.0.20.3:7777"],
}
FIRST_ROLE_TASK = "Install | Debian's prometheus and blackbox exporter packages"


def debian_binary(name: str, package: str = "prometheus") -> str:
    found = shutil.which(name)
    if found is None:
        missing_in_ci_fails(f"{name} not found (Debian 12: apt-get install {package}; make lab-deps does)")
    return found


@pytest.fixture(scope="module")
def promtool() -> str:
    return debian_binary("promtool")


@pytest.fixture(scope="module")
def prometheus() -> str:
    return debian_binary("prometheus")


@pytest.fixture(scope="module")
def blackbox_exporter() -> str:
    return debian_binary("prometheus-blackbox-exporter", "prometheus-blackbox-exporter")


def alert_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return sorted(str(rule["alert"]) for group in groups for rule in group["rules"] if "alert" in rule)


def monitoring_hosts(inventory: Path) -> dict[str, dict[str, Any]]:
    """The inventory's nats_monitoring hosts and their variables (group_vars applied, unrendered)."""
    data = inventory_vars(inventory)
    return {host: data["_meta"]["hostvars"].get(host, {}) for host in data.get("nats_monitoring", {}).get("hosts", [])}


def monitoring_inventory(path: Path) -> Path:
    """An inventory file adding the test's monitoring host (for an inventory without one)."""
    hosts = {MONITORING_HOST: {"ansible_host": MONITORING_ADDRESS}}
    path.write_text(yaml.safe_dump({"all": {"children": {"nats_monitoring": {"hosts": hosts}}}}))
    return path


@dataclass(frozen=True)
class Rendered:
    host: str  # the monitoring host it was rendered for
    installed: dict[str, Any]  # prometheus.yml as the role installs it
    checked: Path  # the same, naming the test's copy of the rules file, for promtool
    flags: str  # /etc/default/prometheus
    blackbox: Path  # /etc/prometheus/blackbox.yml
    blackbox_flags: str  # /etc/default/prometheus-blackbox-exporter
    run: OfflineRun


def render(directory: Path, inventory: Path, *extra: str) -> Rendered:
    """The role's preflight, then its templates into `directory`, for the inventory's monitoring
    host (the test's own if it has none) over a local connection: on the controller only."""
    directory.mkdir(parents=True, exist_ok=True)
    rules = directory / "rules" / "nats-alerts.rules.yml"
    rules.parent.mkdir(exist_ok=True)
    shutil.copy(RULES, rules)
    templates = ROLE / "templates"
    playbook = directory / "render.yml"

    def template(source: str, dest: str, **task_vars: str) -> dict[str, Any]:
        task: dict[str, Any] = {
            "name": f"Render {dest}",
            "ansible.builtin.template": {"src": str(templates / source), "dest": str(directory / dest), "mode": "0644"},
        }
        return task | ({"vars": task_vars} if task_vars else {})

    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Render the Prometheus config offline",
                    "hosts": "nats_monitoring",
                    "gather_facts": False,
                    "tasks": [
                        {
                            "name": "Preflight",
                            "ansible.builtin.include_role": {
                                "name": "nats_monitoring",
                                "tasks_from": "preflight",
                                "public": True,
                            },
                        },
                        template("prometheus.yml.j2", "installed.yml"),
                        template("prometheus.yml.j2", "checked.yml", _nats_monitoring_rules_file=str(rules)),
                        template("prometheus.default.j2", "default"),
                        template("blackbox.yml.j2", "blackbox.yml"),
                        template("prometheus-blackbox-exporter.default.j2", "blackbox-default"),
                    ],
                }
            ]
        )
    )
    sources = ["-i", str(inventory)]
    hosts = monitoring_hosts(inventory)
    if not hosts:
        sources += ["-i", str(monitoring_inventory(directory / "monitoring.yml"))]
        hosts = {MONITORING_HOST: {"ansible_host": MONITORING_ADDRESS}}
    assert len(hosts) == 1, f"one monitoring host expected, not {sorted(hosts)}"
    # Extra vars outrank the inventory: whatever it says, no connection leaves the controller.
    local = ["-e", "ansible_connection=local", "-e", "ansible_become=false"]
    run = run_offline([str(BIN / "ansible-playbook"), *sources, str(playbook), *local, *extra], directory)
    assert run.result.returncode == 0, run.output[-4000:]
    assert run.ssh_calls == [], "rendering connected to a host"
    return Rendered(
        host=next(iter(hosts)),
        installed=yaml.safe_load((directory / "installed.yml").read_text()),
        checked=directory / "checked.yml",
        flags=(directory / "default").read_text(),
        blackbox=directory / "blackbox.yml",
        blackbox_flags=(directory / "blackbox-default").read_text(),
        run=run,
    )


def job(config: dict[str, Any], name: str) -> dict[str, Any]:
    jobs: list[dict[str, Any]] = [scrape for scrape in config["scrape_configs"] if scrape["job_name"] == name]
    assert len(jobs) == 1, [scrape["job_name"] for scrape in config["scrape_configs"]]
    return jobs[0]


def static_targets(config: dict[str, Any], name: str) -> list[tuple[list[str], dict[str, str]]]:
    return [(group["targets"], group.get("labels", {})) for group in job(config, name)["static_configs"]]


def flag_args(flags: str) -> list[str]:
    """ARGS of /etc/default/prometheus as systemd passes them: EnvironmentFile= drops the quotes,
    the unquoted $ARGS of ExecStart= splits at whitespace."""
    lines = [line for line in flags.splitlines() if line.startswith("ARGS=")]
    assert len(lines) == 1, flags
    (value,) = shlex.split(lines[0].removeprefix("ARGS="))
    return value.split()


@pytest.fixture(scope="module", params=sorted(INVENTORIES))
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Rendered]:
    name = str(request.param)
    return name, render(tmp_path_factory.mktemp(f"render-{name}"), INVENTORIES[name])


def monitoring_settings(name: str, host: str) -> dict[str, Any]:
    """The monitoring host's inventory variables (the test's own host: its address only)."""
    settings: dict[str, Any] = monitoring_hosts(INVENTORIES[name]).get(host) or {"ansible_host": MONITORING_ADDRESS}
    return settings


def test_one_target_per_member_labelled_with_node_and_cluster(rendered: tuple[str, Rendered]) -> None:
    name, result = rendered
    data = inventory_vars(INVENTORIES[name])
    hostvars = data["_meta"]["hostvars"]
    members = data["nats_cluster"]["hosts"]
    assert members == ["nats-1", "nats-2", "nats-3"]
    assert {hostvars[h]["nats_server_cluster_name"] for h in members} == {"phx-cluster"}
    expected = [
        ([address], {"node": node, "cluster": "phx-cluster"})
        for node, address in zip(members, EXPORTERS[name], strict=True)
    ]
    assert static_targets(result.installed, "nats") == expected
    assert [f"{hostvars[h]['ansible_host']}:7777" for h in members] == EXPORTERS[name]
    assert job(result.installed, "nats").get("honor_labels") is False
    address = monitoring_settings(name, result.host)["ansible_host"]
    assert static_targets(result.installed, "prometheus") == [([f"{address}:9090"], {})]


def test_each_members_monitor_certificate_is_probed_through_the_local_blackbox_exporter(
    rendered: tuple[str, Rendered],
) -> None:
    name, result = rendered
    members = ["nats-1", "nats-2", "nats-3"]
    monitors = [address.replace(":7777", ":8222") for address in EXPORTERS[name]]
    expected = [
        ([monitor], {"node": node, "cluster": "phx-cluster"}) for node, monitor in zip(members, monitors, strict=True)
    ]
    assert static_targets(result.installed, "nats_tls") == expected
    probe = job(result.installed, "nats_tls")
    assert probe["metrics_path"] == "/probe" and probe["params"] == {"module": ["nats_tls"]}
    # The member's address becomes the probe's target and stays the instance; the blackbox
    # exporter on loopback is what Prometheus calls.
    assert probe["relabel_configs"] == [
        {"source_labels": ["__address__"], "target_label": "__param_target"},
        {"source_labels": ["__param_target"], "target_label": "instance"},
        {"target_label": "__address__", "replacement": "127.0.0.1:9115"},
    ]
    module = yaml.safe_load(result.blackbox.read_text())["modules"]["nats_tls"]
    assert module["prober"] == "tcp" and module["tcp"]["tls"] is True
    assert module["tcp"]["tls_config"]["ca_file"] == "/etc/prometheus/nats-ca.crt"
    assert "insecure_skip_verify" not in module["tcp"]["tls_config"]
    assert flag_args(result.blackbox_flags) == [
        "--config.file=/etc/prometheus/blackbox.yml",
        "--web.listen-address=127.0.0.1:9115",
    ]


def test_the_blackbox_exporter_accepts_its_config_and_refuses_a_misspelt_one(
    rendered: tuple[str, Rendered], blackbox_exporter: str, tmp_path: Path
) -> None:
    """The role's validate: `--config.check` reads the config strictly (unknown fields fail)."""
    _, result = rendered

    def check(path: Path) -> subprocess.CompletedProcess[str]:
        command = [blackbox_exporter, "--config.check", f"--config.file={path}"]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    accepted = check(result.blackbox)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    misspelt = tmp_path / "blackbox.yml"
    misspelt.write_text(result.blackbox.read_text().replace("tls_config:", "tls_confg:"))
    refused = check(misspelt)
    assert refused.returncode != 0 and "tls_confg" in refused.stdout + refused.stderr


def test_intervals_retention_listen_address_and_rules_path(rendered: tuple[str, Rendered]) -> None:
    """What the inventory sets for its monitoring host (the lab: 2 s intervals), else the role's defaults."""
    name, result = rendered
    settings = monitoring_settings(name, result.host)
    assert result.installed["global"] == {
        "scrape_interval": settings.get("nats_monitoring_scrape_interval", "15s"),
        "evaluation_interval": settings.get("nats_monitoring_evaluation_interval", "15s"),
    }
    assert result.installed["rule_files"] == [INSTALLED_RULES]
    assert flag_args(result.flags) == [
        f"--web.listen-address={settings['ansible_host']}:9090",
        "--storage.tsdb.retention.time=15d",
    ]
    # The copy for promtool differs only in where the rules are.
    checked = yaml.safe_load(result.checked.read_text())
    assert checked["rule_files"] == [str(result.checked.parent / "rules" / "nats-alerts.rules.yml")]
    assert checked | {"rule_files": [INSTALLED_RULES]} == result.installed


def test_promtool_accepts_the_config_and_its_rules(rendered: tuple[str, Rendered], promtool: str) -> None:
    _, result = rendered
    checked = subprocess.run(
        [promtool, "check", "config", str(result.checked)], capture_output=True, text=True, timeout=60, check=False
    )
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0, output
    assert "SUCCESS: 1 rule files found" in output
    assert f"SUCCESS: {len(yaml.safe_load(RULES.read_text())['groups'][0]['rules'])} rules found" in output


def test_promtool_refuses_the_config_while_its_rules_are_missing(tmp_path: Path, promtool: str) -> None:
    """Why the role installs the rules before the config: the template's validate reads them."""
    result = render(tmp_path, PHX_INVENTORY)
    (tmp_path / "rules" / "nats-alerts.rules.yml").unlink()
    checked = subprocess.run(
        [promtool, "check", "config", str(result.checked)], capture_output=True, text=True, timeout=60, check=False
    )
    assert checked.returncode != 0
    assert "does not point to an existing file" in checked.stdout + checked.stderr


def test_short_intervals_render_and_pass_promtool(tmp_path: Path, promtool: str) -> None:
    """Scraping every 2 s (as the lab does) is below the default 10 s scrape timeout, which
    Prometheus then shortens to the interval."""
    intervals = ("-e", "nats_monitoring_scrape_interval=2s", "-e", "nats_monitoring_evaluation_interval=2s")
    result = render(tmp_path, PHX_INVENTORY, *intervals)
    assert result.installed["global"] == {"scrape_interval": "2s", "evaluation_interval": "2s"}
    checked = subprocess.run(
        [promtool, "check", "config", str(result.checked)], capture_output=True, text=True, timeout=60, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_member_setting_its_own_exporter_address_and_port_is_scraped_there(tmp_path: Path) -> None:
    inventory = make_inventory(
        tmp_path,
        {"host_vars": {"nats-2": {"nats_exporter_listen_address": "10.231.20.42", "nats_exporter_port": 7800}}},
    )
    result = render(tmp_path / "out", inventory, "-e", "nats_monitoring_exporter_port=7799")
    assert [targets for targets, _ in static_targets(result.installed, "nats")] == [
        ["10.231.20.11:7799"],
        ["10.231.20.42:7800"],
        ["10.231.20.13:7799"],
    ]


# Through playbooks/monitoring.yml, on a copy of the lab inventory with a monitoring host reached
# over (refused) ssh: a refusal must come before the role's first task.
REFUSALS: dict[str, tuple[list[str], str]] = {
    "scrape interval without unit": (
        ["-e", "nats_monitoring_scrape_interval=15"],
        f'{MONITORING_HOST}: nats_monitoring_scrape_interval "15" must be a Prometheus duration above zero',
    ),
    "zero evaluation interval": (
        ["-e", "nats_monitoring_evaluation_interval=0s"],
        f'{MONITORING_HOST}: nats_monitoring_evaluation_interval "0s" must be a Prometheus duration above zero',
    ),
    "retention in words": (
        ["-e", "nats_monitoring_retention='two weeks'"],
        f'{MONITORING_HOST}: nats_monitoring_retention "two weeks" must be a Prometheus duration',
    ),
    "port out of range": (
        ["-e", "nats_monitoring_port=70000"],
        f"{MONITORING_HOST}: nats_monitoring_port 70000 must be a port in 1-65535",
    ),
    "port a word": (
        ["-e", "nats_monitoring_port=web"],
        f"{MONITORING_HOST}: nats_monitoring_port (a str) must be a whole number",
    ),
    "update cache neither true nor false": (
        ["-e", "nats_monitoring_apt_update_cache=maybe"],
        f"{MONITORING_HOST}: nats_monitoring_apt_update_cache 'maybe' must be true or false",
    ),
    "listen on IPv6": (
        ["-e", "nats_monitoring_listen_address=::1"],
        f'{MONITORING_HOST}: nats_monitoring_listen_address "::1" must be an IPv4 address or a host name',
    ),
    "cluster group missing": (
        ["-e", "nats_monitoring_cluster_group=nats_clutser"],
        f'{MONITORING_HOST}: nats_monitoring_cluster_group "nats_clutser" is not a group of this inventory',
    ),
    "cluster group empty": (
        ["-e", "nats_monitoring_cluster_group=nats_spare"],
        f'{MONITORING_HOST}: nats_monitoring_cluster_group "nats_spare" has no hosts',
    ),
    "exporter on every interface": (
        ["-e", "nats_exporter_listen_address=0.0.0.0"],
        'nats-1: the exporter address "0.0.0.0" (nats_exporter_listen_address, else nats_server_address, else '
        "ansible_host) must be an IPv4 address or host name Prometheus can reach",
    ),
    # monitoring.yml opens with the whole preflight: the exporter's own check refuses it first.
    "exporter port zero": (
        ["-e", "nats_exporter_port=0"],
        "nats-3: nats_exporter_port 0 must be a port in 1-65535 other than the server's client",
    ),
}


def monitoring_playbook(tmp_path: Path, *args: str, with_group: bool = True) -> OfflineRun:
    """playbooks/monitoring.yml on a copy of the lab inventory whose nats_monitoring group is the
    test's host alone (reached over the refusing ssh), or absent; plus an empty group nats_spare."""
    inventory = make_inventory(tmp_path, {})
    hosts_file = inventory / "hosts.yml"
    hosts = yaml.safe_load(hosts_file.read_text())
    children = hosts["all"]["children"]
    children.pop("nats_monitoring", None)
    children["nats_spare"] = {}
    if with_group:
        children["nats_monitoring"] = {"hosts": {MONITORING_HOST: {"ansible_host": MONITORING_ADDRESS}}}
    hosts_file.write_text(yaml.safe_dump(hosts))
    return run_offline_playbook("monitoring.yml", inventory, *args, tmp_path=tmp_path)


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_settings_are_refused_before_any_host_is_touched(case: str, tmp_path: Path) -> None:
    args, expected = REFUSALS[case]
    run = monitoring_playbook(tmp_path, *args)
    output = " ".join(run.output.split())
    assert run.result.returncode != 0, output[-2000:]
    assert expected in output, output[-3000:]
    assert run.ssh_calls == [], "a refused setting connected to a host"
    assert FIRST_ROLE_TASK not in output
    assert_one_short_refusal(run.output)


def test_sound_settings_pass_the_preflight_and_only_the_monitoring_host_is_contacted(tmp_path: Path) -> None:
    run = monitoring_playbook(tmp_path)
    assert "Scrape targets rejected" not in run.output and "fatal: [prometheus-1]: FAILED!" not in run.output
    assert FIRST_ROLE_TASK in run.output, run.output[-3000:]
    # The refusing ssh stops it there; it tried the monitoring host and nothing else.
    assert "UNREACHABLE" in run.output and run.result.returncode != 0
    assert run.ssh_calls and all(MONITORING_ADDRESS in call for call in run.ssh_calls), run.ssh_calls
    assert not any("10.231.20." in call for call in run.ssh_calls)


def test_an_inventory_without_a_monitoring_group_does_nothing(tmp_path: Path) -> None:
    run = monitoring_playbook(tmp_path, with_group=False)
    assert run.result.returncode == 0, run.output[-3000:]
    assert "skipping: no hosts matched" in run.output
    assert run.ssh_calls == []


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.load(reply)


def wait_for(what: str, check: Any, process: subprocess.Popen[bytes], log: Path, seconds: float = 60) -> Any:
    """check() until it returns something truthy; fails with Prometheus's log if it never does."""
    deadline = time.monotonic() + seconds
    last: object = None
    while time.monotonic() < deadline:
        assert process.poll() is None, f"prometheus exited ({process.returncode}):\n{log.read_text()[-3000:]}"
        try:
            result = check()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            result, last = None, error
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"{what} not seen in {seconds} s (last: {last!r}):\n{log.read_text()[-3000:]}")


@pytest.fixture
def loopback_render(tmp_path: Path) -> tuple[Path, Rendered, dict[str, int], int]:
    """A copy of the lab inventory whose members' exporters and monitors (the certificate probe's
    targets) are loopback ports where nothing listens, and a monitoring host on 127.0.0.1 with a
    free port: nothing leaves the machine."""
    exporter_ports = {f"nats-{i}": free_port() for i in (1, 2, 3)}
    host_vars = {
        node: {
            "nats_exporter_listen_address": "127.0.0.1",
            "nats_exporter_port": port,
            "nats_server_monitor_host": "127.0.0.1",
            "nats_server_monitor_port": free_port(),
        }
        for node, port in exporter_ports.items()
    }
    inventory = make_inventory(tmp_path, {"host_vars": host_vars})
    port = free_port()
    out = tmp_path / "out"
    loopback = ("-e", "nats_monitoring_listen_address=127.0.0.1", "-e", f"nats_monitoring_port={port}")
    result = render(out, inventory, *loopback)
    for scrape in ("nats", "nats_tls"):
        targets = [t for group, _ in static_targets(result.installed, scrape) for t in group]
        assert all(t.startswith("127.0.0.1:") for t in targets), targets
    return inventory, result, exporter_ports, port


@pytest.fixture
def running_prometheus(
    prometheus: str, loopback_render: tuple[Path, Rendered, dict[str, int], int], tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """Debian's prometheus with the rendered flags and config (its data under tmp_path); stopped after."""
    _, result, _, port = loopback_render
    args = flag_args(result.flags)
    assert f"--web.listen-address=127.0.0.1:{port}" in args
    log = tmp_path / "prometheus.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [prometheus, *args, f"--config.file={result.checked}", f"--storage.tsdb.path={tmp_path / 'data'}"],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        yield process, f"http://127.0.0.1:{port}", log
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_prometheus_loads_the_config_and_every_alert_and_rereads_it_on_sighup(
    loopback_render: tuple[Path, Rendered, dict[str, int], int],
    running_prometheus: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    inventory, result, exporter_ports, _ = loopback_render
    process, url, log = running_prometheus

    def ready() -> bool:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=5) as reply:
            return bool(reply.status == 200)

    wait_for("/-/ready 200", ready, process, log)

    def loaded_alerts() -> list[str]:
        groups = get_json(f"{url}/api/v1/rules?type=alert")["data"]["groups"]
        return sorted(rule["name"] for group in groups for rule in group["rules"])

    assert wait_for("the alert rules", loaded_alerts, process, log) == alert_names()

    expected = [
        {"job": "nats", "instance": f"127.0.0.1:{port}", "node": node, "cluster": "phx-cluster"}
        for node, port in sorted(exporter_ports.items())
    ]

    def nats_targets() -> list[dict[str, str]]:
        active = get_json(f"{url}/api/v1/targets?state=active")["data"]["activeTargets"]
        return sorted((t["labels"] for t in active if t["labels"]["job"] == "nats"), key=lambda labels: labels["node"])

    assert wait_for("the nats targets", lambda: nats_targets() == expected, process, log)

    # What the role's reload handler does (Debian's ExecReload=/bin/kill -HUP $MAINPID).
    port = url.rsplit(":", 1)[1]
    loopback = ("-e", "nats_monitoring_listen_address=127.0.0.1", "-e", f"nats_monitoring_port={port}")
    render(result.checked.parent, inventory, *loopback, "-e", "nats_monitoring_scrape_interval=7s")
    process.send_signal(signal.SIGHUP)

    def reloaded() -> bool:
        config = yaml.safe_load(get_json(f"{url}/api/v1/status/config")["data"]["yaml"])
        return bool(config["global"]["scrape_interval"] == "7s")

    wait_for("the re-read config", reloaded, process, log)
    assert process.poll() is None
