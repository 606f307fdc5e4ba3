"""JetStream limits as the server enforces them, and how close each usage is: plain arithmetic over
the server's own JSON (`$JS.API.INFO`, `$JS.API.STREAM.INFO.<stream>`, the monitor's `/jsz`).
No I/O: the checks in verify/checks/test_cluster.py fetch, this module judges.

A usage at 80% of its limit is a warning, at 100% a failure. A limit of -1 or 0 (or none at all)
is no limit. Which limit binds a stream's consumers is the server's rule (jetstream_cluster.go,
measured on 2.15.1): the stream's own `max_consumers`, lowered to the account's `max_consumers`
when that is smaller (the account's limit counts per stream, not across the account); with
neither set, the server's `default_max_consumers` (/jsz `limits`, 1000 on 2.15.1).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

WARN_PERCENT = 80
FAIL_PERCENT = 100
# RUNBOOKS keys in verify/plugin.py: what the operator does about each kind of limit.
CONSUMERS_RUNBOOK = "consumers"
CAPACITY_RUNBOOK = "capacity"

Level = Literal["ok", "warn", "fail"]


def limited(value: Any) -> int | None:
    """The limit, or None when there is none (-1, 0, missing)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def human_bytes(count: int) -> str:
    """1023 B, 1.0 KiB, 44.2 GiB (binary units, as the server's sizes)."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def _amount(count: int, unit: str) -> str:
    return human_bytes(count) if unit == "B" else str(count)


@dataclass(frozen=True)
class Usage:
    """One figure against one limit. `scope` names the owner ("stream ORDERS", "account APP",
    "server nats-1"), `limit` the limit as the operator sets it."""

    scope: str
    limit: str
    used: int
    maximum: int
    runbook: str
    unit: str = ""
    note: str = ""

    @property
    def percent(self) -> int:
        """Rounded down: 79.9% shows as 79, never as the 80 that warns."""
        return self.used * 100 // self.maximum

    @property
    def level(self) -> Level:
        if self.used * 100 >= FAIL_PERCENT * self.maximum:
            return "fail"
        if self.used * 100 >= WARN_PERCENT * self.maximum:
            return "warn"
        return "ok"

    @property
    def figure(self) -> str:
        return f"{_amount(self.used, self.unit)} of {_amount(self.maximum, self.unit)}"

    def message(self) -> str:
        state = "reached" if self.level == "fail" else "at"
        note = f"; {self.note}" if self.note else ""
        return f"{self.scope}: {self.limit} {state} {self.percent}% ({self.figure}{note})"


def usage(
    scope: str, limit: str, used: Any, maximum: Any, runbook: str, *, unit: str = "", note: str = ""
) -> Usage | None:
    """A Usage, or None when `maximum` is no limit."""
    bound = limited(maximum)
    if bound is None:
        return None
    return Usage(scope, limit, int(used or 0), bound, runbook, unit, note)


def judge(usages: Iterable[Usage | None]) -> tuple[list[Usage], list[Usage]]:
    """(warnings, failures): the usages at 80% or more, and those at 100% or more."""
    present = [u for u in usages if u is not None]
    return [u for u in present if u.level == "warn"], [u for u in present if u.level == "fail"]


def account_limits(info: Mapping[str, Any], replicas: int | None = None) -> Mapping[str, Any]:
    """The limits that govern a stream of `replicas` replicas: the account's tier for it (R1, R3)
    when the account has tiered limits, else the account's own."""
    tier = (info.get("tiers") or {}).get(f"R{replicas}") if replicas else None
    tier_limits = (tier or {}).get("limits") or {}
    if any(limited(v) for k, v in tier_limits.items() if k.startswith("max_")):
        return dict(tier_limits)
    return dict(info.get("limits") or {})


def consumer_limit(
    config: Mapping[str, Any], account: Mapping[str, Any], server_default: Any = None
) -> tuple[int, str] | None:
    """(limit, which) binding one stream's consumers, or None when nothing limits them."""
    own = limited(config.get("max_consumers"))
    shared = limited(account.get("max_consumers"))
    if own is not None and (shared is None or own <= shared):
        return own, "its max_consumers"
    if shared is not None:
        return shared, "the account's max_consumers (counted per stream)"
    fallback = limited(server_default)
    if fallback is not None:
        return fallback, "the server's default_max_consumers"
    return None


def _replicas(stream: Mapping[str, Any]) -> int:
    return int((stream.get("config") or {}).get("num_replicas") or 1)


def consumer_usages(
    streams: Mapping[str, Mapping[str, Any]], info: Mapping[str, Any], server_default: Any = None
) -> list[Usage]:
    """Each stream's consumers (STREAM.INFO `state.consumer_count`, counted cluster-wide by the
    stream leader) against the limit that binds them."""
    usages = []
    for name, stream in sorted(streams.items()):
        bound = consumer_limit(stream.get("config") or {}, account_limits(info, _replicas(stream)), server_default)
        if bound is None:
            continue
        maximum, which = bound
        count = int((stream.get("state") or {}).get("consumer_count") or 0)
        usages.append(
            Usage(
                f"stream {name}",
                f"consumers vs {which}",
                count,
                maximum,
                CONSUMERS_RUNBOOK,
                note="at the limit new consumers on it are refused, error 10026",
            )
        )
    return usages


def account_usages(account: str, info: Mapping[str, Any]) -> list[Usage]:
    """The account's memory, storage and streams (account info, whole cluster, replicas
    included) against its limits, and each tier's against the tier's."""
    scopes: list[tuple[str, Mapping[str, Any]]] = [(f"account {account}", info)]
    scopes += [(f"account {account} tier {tier}", v) for tier, v in sorted((info.get("tiers") or {}).items())]
    found: list[Usage | None] = []
    for scope, figures in scopes:
        limits = figures.get("limits") or {}
        found += [
            usage(scope, "max_memory", figures.get("memory"), limits.get("max_memory"), CAPACITY_RUNBOOK, unit="B"),
            usage(scope, "max_storage", figures.get("storage"), limits.get("max_storage"), CAPACITY_RUNBOOK, unit="B"),
            usage(
                scope,
                "max_streams",
                figures.get("streams"),
                limits.get("max_streams"),
                CAPACITY_RUNBOOK,
                note="new streams are refused at the limit",
            ),
        ]
    return [u for u in found if u is not None]


def _discard_note(config: Mapping[str, Any]) -> str:
    if str(config.get("discard", "old")) == "new":
        return "discard new: at the limit publishes are refused"
    return "discard old: at the limit the oldest messages are deleted"


def stream_usages(name: str, stream: Mapping[str, Any]) -> list[Usage]:
    """A stream's bytes and messages against its own max_bytes and max_msgs, when set."""
    config, state = stream.get("config") or {}, stream.get("state") or {}
    note, scope = _discard_note(config), f"stream {name}"
    found = [
        usage(scope, "max_bytes", state.get("bytes"), config.get("max_bytes"), CAPACITY_RUNBOOK, unit="B", note=note),
        usage(scope, "max_msgs", state.get("messages"), config.get("max_msgs"), CAPACITY_RUNBOOK, note=note),
    ]
    return [u for u in found if u is not None]


def server_usages(host: str, jsz: Mapping[str, Any]) -> list[Usage]:
    """One server's store (/jsz: what it holds of every replica on it) against its own limits."""
    config, limits = jsz.get("config") or {}, jsz.get("limits") or {}
    scope = f"server {host}"
    found = [
        usage(scope, "max_file_store", jsz.get("storage"), config.get("max_storage"), CAPACITY_RUNBOOK, unit="B"),
        usage(scope, "max_memory_store", jsz.get("memory"), config.get("max_memory"), CAPACITY_RUNBOOK, unit="B"),
        usage(scope, "max_ha_assets", jsz.get("ha_assets"), limits.get("max_ha_assets"), CAPACITY_RUNBOOK),
    ]
    return [u for u in found if u is not None]


def _of(count: Any, maximum: Any, unit: str = "") -> str:
    used = _amount(int(count or 0), unit)
    bound = limited(maximum)
    return f"{used} of {_amount(bound, unit)}" if bound is not None else f"{used} (no limit)"


def account_line(
    account: str, info: Mapping[str, Any], streams: Mapping[str, Mapping[str, Any]], server_default: Any = None
) -> str:
    """The report's account line: consumers (total, and the fullest stream against the limit that
    binds it), streams, memory and storage against the account's limits."""
    limits = info.get("limits") or {}
    fullest = max(consumer_usages(streams, info, server_default), key=lambda u: (u.percent, u.used), default=None)
    per_stream = f", fullest stream {fullest.scope.removeprefix('stream ')} {fullest.figure}" if fullest else ""
    return (
        f"account {account}: consumers {int(info.get('consumers') or 0)}{per_stream}, "
        f"streams {_of(info.get('streams'), limits.get('max_streams'))}, "
        f"memory {_of(info.get('memory'), limits.get('max_memory'), 'B')}, "
        f"storage {_of(info.get('storage'), limits.get('max_storage'), 'B')}"
    )
