"""The Prometheus alert rules (roles/nats_monitoring/files/nats-alerts.rules.yml): promtool accepts
them, their unit tests (tests/alert_rules/nats-alerts.test.yml) pass and would catch a broken rule,
and every alert names its node and a runbook page that exists.

promtool is Debian 12's (package prometheus, /usr/bin/promtool); without it these tests skip,
and fail with CI=true.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import REPO, missing_in_ci_fails

RULES = REPO / "roles" / "nats_monitoring" / "files" / "nats-alerts.rules.yml"
UNIT_TESTS = REPO / "tests" / "alert_rules" / "nats-alerts.test.yml"
NATS_SERVER_DEFAULTS = REPO / "roles" / "nats_server" / "defaults" / "main.yml"

# Every metric a rule may use: Prometheus's own `up`, and what prometheus-nats-exporter v0.12.0
# (-varz -connz -routez -subz -healthz -jsz=streams -use_internal_server_name) exported against a
# real nats-server 2.15.1 (a loopback trio with an R3 stream and a consumer; the stale-NFS case
# through nats_lab/cimnfs.py); and what Debian's blackbox exporter (0.23) exports for a TCP probe
# with TLS (job nats_tls; seen on the lab by tests/lab_deploy/test_alerts.py). A misspelt metric
# is no error to PromQL, only an alert that never fires.
EXPORTED_METRICS = frozenset(
    {
        "up",
        "probe_success",
        "probe_ssl_earliest_cert_expiry",
        "gnatsd_healthz_status",
        "gnatsd_routez_num_routes",
        "gnatsd_varz_jetstream_config_max_memory",
        "gnatsd_varz_jetstream_config_max_storage",
        "gnatsd_varz_jetstream_stats_memory",
        "gnatsd_varz_jetstream_stats_storage",
        "gnatsd_varz_slow_consumers",
        "jetstream_server_jetstream_disabled",
        "jetstream_stream_consumer_count",
        "jetstream_stream_last_seq",
    }
)
PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool"})


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        missing_in_ci_fails("promtool not found (Debian 12: apt-get install prometheus)")
    return found


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, check=False)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alerting_rules() -> list[dict[str, Any]]:
    groups = load_yaml(RULES)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def alert_names() -> list[str]:
    return [str(rule["alert"]) for rule in alerting_rules()]


def unit_test_cases() -> list[dict[str, Any]]:
    return [case for test in load_yaml(UNIT_TESTS)["tests"] for case in test.get("alert_rule_test", [])]


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers outside label matchers, grouping
    clauses, ranges and offsets that are not functions, aggregations or keywords."""
    text = re.sub(r'"[^"]*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    return set(re.findall(r"(?<![\w.])([A-Za-z_:][\w:]*)\b(?!\s*\()", text)) - PROMQL_KEYWORDS


def test_promtool_accepts_the_rules(promtool: str) -> None:
    checked = run_promtool(promtool, "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(load_yaml(RULES)['groups'][0]['rules'])} rules found" in checked.stdout


def test_the_rule_unit_tests_pass(promtool: str) -> None:
    tested = run_promtool(promtool, "test", "rules", str(UNIT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_one_group_named_nats() -> None:
    assert [group["name"] for group in load_yaml(RULES)["groups"]] == ["nats"]


@pytest.mark.parametrize("rule", alerting_rules(), ids=alert_names())
def test_every_alert_names_its_node_and_an_existing_runbook(rule: dict[str, Any]) -> None:
    annotations = rule.get("annotations") or {}
    assert {"summary", "description", "runbook"} <= set(annotations), annotations
    assert "{{ $labels.node }}" in annotations["summary"]
    runbook = annotations["runbook"]
    assert re.fullmatch(r"docs/(runbooks/)?[a-z0-9-]+\.md", runbook) or runbook == "docs/runbooks/README.md", runbook
    assert (REPO / runbook).is_file(), f"{rule['alert']}: runbook {runbook} is not in the repository"
    assert rule.get("labels", {}).get("severity") in {"critical", "warning"}


@pytest.mark.parametrize("rule", alerting_rules(), ids=alert_names())
def test_every_alert_uses_only_metrics_the_exporter_exports(rule: dict[str, Any]) -> None:
    used = metric_names(rule["expr"])
    assert used, f"{rule['alert']}: no metric found in {rule['expr']!r}"
    assert used <= EXPORTED_METRICS, f"{rule['alert']}: not exported: {sorted(used - EXPORTED_METRICS)}"


def test_metric_names_reads_promql() -> None:
    expr = (
        "max by (cluster, stream_name) (jetstream_stream_last_seq offset 30s) - on (cluster) group_right ()"
        ' up{job="nats", x="a and b"} and increase(gnatsd_varz_slow_consumers[5m]) > 0.8 * 4096'
    )
    assert metric_names(expr) == {"jetstream_stream_last_seq", "up", "gnatsd_varz_slow_consumers"}


@pytest.mark.parametrize("alert", alert_names())
def test_every_alert_has_a_firing_and_a_silent_unit_test(alert: str) -> None:
    cases = [case for case in unit_test_cases() if case["alertname"] == alert]
    firing = [case for case in cases if case.get("exp_alerts")]
    assert firing, f"{alert}: no unit test where it fires"
    assert any(case.get("exp_alerts") == [] for case in cases), f"{alert}: no unit test where it stays silent"
    for case in firing:
        for expected in case["exp_alerts"]:
            assert expected["exp_labels"].get("node"), f"{alert} at {case['eval_time']}: exp_labels without node"
            assert expected["exp_annotations"].get("summary"), f"{alert} at {case['eval_time']}: no summary"


def test_unit_tests_name_only_existing_alerts() -> None:
    """An alertname promtool does not know passes any `exp_alerts: []` silently."""
    unknown = {case["alertname"] for case in unit_test_cases()} - set(alert_names())
    assert not unknown, f"unit tests for alerts the rules do not define: {sorted(unknown)}"


def break_metric(expr: str, metric: str) -> str:
    """The expression with `metric` misspelt, as a typo would."""
    return re.sub(rf"(?<![\w.]){re.escape(metric)}\b(?!\s*\()", metric + "_misspelt", expr)


def rule_metrics() -> list[tuple[str, str]]:
    return [(str(rule["alert"]), metric) for rule in alerting_rules() for metric in sorted(metric_names(rule["expr"]))]


@pytest.mark.parametrize(("alert", "metric"), rule_metrics(), ids=[f"{a}-{m}" for a, m in rule_metrics()])
def test_unit_tests_fail_when_a_rule_misspells_a_metric(promtool: str, tmp_path: Path, alert: str, metric: str) -> None:
    """Each metric of each rule matters to its unit tests: misspelt, the rule fires where it must
    not, or stays silent where it must fire."""
    rules = load_yaml(RULES)
    for rule in rules["groups"][0]["rules"]:
        if rule.get("alert") == alert:
            broken = break_metric(rule["expr"], metric)
            assert broken != rule["expr"]
            rule["expr"] = broken
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    tests = load_yaml(UNIT_TESTS) | {"rule_files": ["rules.yml"]}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    assert run_promtool(promtool, "check", "rules", str(tmp_path / "rules.yml")).returncode == 0
    tested = run_promtool(promtool, "test", "rules", str(tmp_path / "tests.yml"))
    assert tested.returncode != 0, f"promtool test still passes with {metric} misspelt in {alert}"
    assert f"alertname: {alert}," in tested.stdout + tested.stderr


def test_consumer_threshold_is_80_percent_of_the_accounts_limit() -> None:
    """v0.12.0 does not export the account's max_consumers: the rule carries the role's default."""
    limit = load_yaml(NATS_SERVER_DEFAULTS)["nats_server_app_jetstream_limits"]["max_consumers"]
    rule = next(rule for rule in alerting_rules() if rule["alert"] == "NatsStreamConsumersHigh")
    assert f">= 0.8 * {limit}" in rule["expr"]
    assert f"of the {limit} the account allows" in rule["annotations"]["description"]


def test_route_rule_counts_one_route_per_peer() -> None:
    """NatsRouteDown expects members - 1 routes: true only without route pooling."""
    assert load_yaml(NATS_SERVER_DEFAULTS)["nats_server_cluster_pool_size"] == -1
