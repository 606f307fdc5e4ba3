"""The lab's Prometheus (roles/nats_monitoring on the inventory's nats_monitoring host), as the lab
tests ask it: its address from the inventory, the alerts firing now, waiting for a condition on
them, and one instant query."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from tests.helpers import LAB_INVENTORY, inventory_vars, role_defaults

Alerts = list[dict[str, str]]


def prometheus_url() -> str:
    data = inventory_vars(LAB_INVENTORY)
    (monitor,) = data["nats_monitoring"]["hosts"]
    settings = role_defaults("nats_monitoring") | data["_meta"]["hostvars"][monitor]
    return f"http://{settings['ansible_host']}:{settings['nats_monitoring_port']}"


def api(path: str) -> Any:
    with urllib.request.urlopen(f"{prometheus_url()}/api/v1/{path}", timeout=5) as answer:
        return json.load(answer)["data"]


def firing() -> Alerts:
    """The labels of every firing alert."""
    return [a["labels"] for a in api("alerts")["alerts"] if a["state"] == "firing"]


def query(expr: str) -> dict[str, float]:
    """An instant query's samples by their `node` label."""
    result = api(f"query?query={urllib.parse.quote(expr)}")["result"]
    return {sample["metric"].get("node", ""): float(sample["value"][1]) for sample in result}


def wait_for(condition: Callable[[Alerts], bool], seconds: float, what: str) -> tuple[float, Alerts]:
    """Seconds until the firing alerts meet CONDITION, and those alerts; fails after SECONDS."""
    start = time.monotonic()
    while True:
        now = firing()
        if condition(now):
            return time.monotonic() - start, now
        if time.monotonic() - start > seconds:
            raise AssertionError(f"{what} not within {seconds:g} s; firing: {now}")
        time.sleep(1)
