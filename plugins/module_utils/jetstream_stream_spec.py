"""Declared JetStream streams (inventory data) in the JetStream API's own form, and what it takes to
get from a stream's current config to the declared one.

Shared by the `jetstream_streams` module (which applies them), the preflight filter (which checks
them before any host is touched) and verify (which checks them on the cluster), so all three read a
declaration the same way. Plain Python, no Ansible imports.

The cluster holds an event store: a declared stream keeps every event unless its declaration says
otherwise with `deletes_old_events: true`. Keys that decide whether events are deleted are always
managed, with keep-everything defaults when not declared (no age limit, refuse writes when full,
message delete and purge denied), so leaving a key out never leaves an old deleting setting behind.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

NANOS = 1_000_000_000
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|ms|s|m|h|d)")
# The server stores sizes and durations as signed 64-bit integers.
INT64_MAX = (1 << 63) - 1

# Declared key -> (API key, kind). Only these are managed; anything else on a stream is left alone.
FIELDS: dict[str, tuple[str, str]] = {
    "description": ("description", "str"),
    "subjects": ("subjects", "list"),
    "storage": ("storage", "str"),
    "replicas": ("num_replicas", "int"),
    "retention": ("retention", "str"),
    "discard": ("discard", "str"),
    "max_age": ("max_age", "duration"),
    "max_bytes": ("max_bytes", "size"),
    "max_msgs": ("max_msgs", "int"),
    "max_msgs_per_subject": ("max_msgs_per_subject", "int"),
    "max_msg_size": ("max_msg_size", "size"),
    "max_consumers": ("max_consumers", "int"),
    "duplicate_window": ("duplicate_window", "duration"),
    "allow_direct": ("allow_direct", "bool"),
    "allow_atomic": ("allow_atomic", "bool"),
    "allow_rollup": ("allow_rollup_hdrs", "bool"),
    "deny_delete": ("deny_delete", "bool"),
    "deny_purge": ("deny_purge", "bool"),
    "consumer_inactive_threshold": ("consumer_limits.inactive_threshold", "duration"),
}
# Declared keys that are not stream settings.
META_KEYS = {"name", "consumers", "deletes_old_events"}
CHOICES = {
    "storage": {"file", "memory"},
    "retention": {"limits", "interest", "workqueue"},
    "discard": {"old", "new"},
}
# Limits that drop stored messages when lowered.
RETENTION_LIMITS = ("max_age", "max_bytes", "max_msgs", "max_msgs_per_subject")
# What the server means when it leaves a key out (or sends 0/-1): the comparison uses these.
SERVER_DEFAULTS: dict[str, Any] = {
    "retention": "limits",
    "discard": "old",
    "max_age": 0,
    "max_bytes": -1,
    "max_msgs": -1,
    "max_msgs_per_subject": -1,
    "max_msg_size": -1,
    "max_consumers": -1,
    "allow_direct": False,
    "allow_atomic": False,
    "allow_rollup_hdrs": False,
    "deny_delete": False,
    "deny_purge": False,
    # None: a stream default would also bind every durable consumer that sets none (measured on
    # 2.15.1), and the server's own 5 s default for ephemeral consumers is what ends the CIM's
    # never-deleted read consumers (docs/streams.md).
    "consumer_limits.inactive_threshold": 0,
}
# Managed on every declared stream, with these values when the declaration leaves them out: an
# event store keeps every event and refuses a write when full rather than drop the oldest.
KEEP_EVERY_EVENT: dict[str, Any] = {
    "retention": "limits",
    "discard": "new",
    "max_age": 0,
    "max_bytes": -1,
    "max_msgs": -1,
    "max_msgs_per_subject": -1,
    "allow_rollup_hdrs": False,
    "deny_delete": True,
    "deny_purge": True,
    "consumer_limits.inactive_threshold": 0,
}
_UNLIMITED_WHEN_ZERO = {"max_age", "consumer_limits.inactive_threshold"}


class DeclarationError(ValueError):
    """A declared stream that cannot be applied; the message names the stream and the key."""


def parse_size(value: Any) -> int:
    """512MB, 10GB, 1T (1024-based, as nats-server reads them) or a number of bytes; -1 = unlimited."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        match = re.fullmatch(r"\s*(-1|[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", str(value).upper())
        if not match or (match.group(1) == "-1" and match.group(2)):
            raise ValueError(f"not a size: {value!r}")
        number = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if number < -1 or number > INT64_MAX:
        raise ValueError(f"size out of range: {value!r}")
    return number


def parse_duration(value: Any) -> int:
    """30d, 2m, 1h, 90s, 500ms, Go-style 1m30s or a number of seconds -> nanoseconds (never negative)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"negative duration: {value!r}")
        nanos = int(value * NANOS)
    else:
        text = str(value).strip()
        if not text or not re.fullmatch(f"(?:{_DURATION_PART.pattern})+", text):
            raise ValueError(f"not a duration: {value!r}")
        nanos = round(sum(float(n) * _DURATION_UNITS[unit] * NANOS for n, unit in _DURATION_PART.findall(text)))
    if nanos > INT64_MAX:
        raise ValueError(f"duration out of range: {value!r}")
    return nanos


def _convert(name: str, key: str, kind: str, value: Any) -> Any:
    try:
        if kind == "size":
            return parse_size(value)
        if kind == "duration":
            return parse_duration(value)
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"not a whole number: {value!r}")
            if value < -1 or value > INT64_MAX:
                raise ValueError(f"out of range: {value!r}")
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"not true/false: {value!r}")
            return value
        if kind == "list":
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"not a list of subjects: {value!r}")
            return sorted(value)
        if not isinstance(value, str):
            raise ValueError(f"not a string: {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise ValueError(f"{value!r} is not one of {sorted(CHOICES[key])}")
        return value
    except ValueError as error:
        raise DeclarationError(f"stream {name}: {key}: {error}") from error


def event_deletion(config: Mapping[str, Any]) -> list[str]:
    """How a stream config (flat API keys) deletes events, each way in words; [] keeps every event."""
    ways = []
    if config.get("max_age", 0) > 0:
        ways.append("max_age deletes events older than that")
    if config.get("retention", "limits") != "limits":
        ways.append(f"retention {config['retention']} deletes events once they are consumed")
    if config.get("discard", "old") == "old":
        ways.extend(
            f"{key} with discard old deletes the oldest events when the stream is full"
            for key in ("max_bytes", "max_msgs", "max_msgs_per_subject")
            if config.get(key, -1) > 0
        )
    if config.get("allow_rollup_hdrs"):
        ways.append("allow_rollup lets a publisher delete a subject's earlier events")
    if not config.get("deny_delete", False):
        ways.append("deny_delete false lets clients delete events")
    if not config.get("deny_purge", False):
        ways.append("deny_purge false lets clients purge the stream")
    return ways


def desired_config(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The declared stream as flat API fields ({'num_replicas': 3, 'consumer_limits.inactive_threshold': ns ...}),
    with the keep-every-event defaults for the deletion keys it leaves out. Refuses a declaration
    that would delete events unless it says `deletes_old_events: true`."""
    if not isinstance(spec, Mapping):
        raise DeclarationError(f"a declared stream must be a mapping with name, subjects ...: got {spec!r}")
    name = spec.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", name):
        raise DeclarationError(f"stream name {name!r} must be letters, digits, '-' or '_'")
    unknown = sorted(set(spec) - set(FIELDS) - META_KEYS)
    if unknown:
        raise DeclarationError(f"stream {name}: unknown keys {unknown} (known: {sorted(set(FIELDS) | META_KEYS)})")
    for required in ("subjects", "storage", "replicas"):
        if required not in spec:
            raise DeclarationError(f"stream {name}: {required} is required")
    deletes = spec.get("deletes_old_events", False)
    if not isinstance(deletes, bool):
        raise DeclarationError(f"stream {name}: deletes_old_events: not true/false: {deletes!r}")
    config: dict[str, Any] = {"name": name} | KEEP_EVERY_EVENT
    for key, value in spec.items():
        if key in FIELDS:
            api_key, kind = FIELDS[key]
            config[api_key] = _convert(name, key, kind, value)
    if config["num_replicas"] < 1:
        raise DeclarationError(f"stream {name}: replicas: must be at least 1, got {config['num_replicas']}")
    ways = event_deletion(config)
    if ways and not deletes:
        raise DeclarationError(
            f"stream {name} would delete events ({'; '.join(ways)}): an event store keeps them. Remove those "
            "settings, or declare deletes_old_events: true if this stream may delete events on purpose"
        )
    return config


def _normal(api_key: str, value: Any) -> Any:
    """The server's value with its "unlimited" spellings made one (0 and -1 for limits)."""
    if value is None:
        return SERVER_DEFAULTS.get(api_key)
    if api_key in _UNLIMITED_WHEN_ZERO:
        return max(value, 0)
    if api_key in SERVER_DEFAULTS and isinstance(value, int) and not isinstance(value, bool) and value <= 0:
        return -1
    return value


def flatten(api_config: Mapping[str, Any]) -> dict[str, Any]:
    """A stream config as the server returns it, flattened to the managed API keys; a key the
    server left out takes the value the server means by that."""
    flat: dict[str, Any] = {}
    for api_key, kind in FIELDS.values():
        head, _, tail = api_key.partition(".")
        value = api_config.get(head)
        if tail:
            value = (value or {}).get(tail)
        value = getattr(value, "value", value)  # nats-py hands back enums for storage, retention ...
        value = _normal(api_key, value)
        if value is None:
            continue
        flat[api_key] = sorted(value) if kind == "list" else value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        head, _, tail = key.partition(".")
        if tail:
            nested.setdefault(head, {})[tail] = value
        else:
            nested[head] = value
    return nested


def changes(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{api key: (current, desired)} for every managed key whose value differs."""
    now = flatten(current)
    return {k: (now.get(k), v) for k, v in desired.items() if k != "name" and now.get(k) != _normal(k, v)}


def destructive(name: str, diff: Mapping[str, tuple[Any, Any]]) -> list[str]:
    """The changes that lose data or availability, each said in words."""
    found = []
    if "storage" in diff:
        found.append(f"stream {name}: storage {diff['storage'][0]} -> {diff['storage'][1]} (recreates the stream)")
    if "retention" in diff:
        found.append(f"stream {name}: retention {diff['retention'][0]} -> {diff['retention'][1]}")
    if "num_replicas" in diff and (diff["num_replicas"][0] or 0) > diff["num_replicas"][1]:
        found.append(f"stream {name}: replicas {diff['num_replicas'][0]} -> {diff['num_replicas'][1]} (fewer copies)")
    if "subjects" in diff:
        removed = sorted(set(diff["subjects"][0] or []) - set(diff["subjects"][1]))
        if removed:
            found.append(f"stream {name}: subjects removed {removed} (their messages stop being stored)")
    for key in RETENTION_LIMITS:
        if key in diff:
            before, after = diff[key]
            # 0 (max_age) and -1 (the others) mean unlimited.
            if not _unlimited(after) and (_unlimited(before) or after < before):
                found.append(f"stream {name}: {key} lowered {before} -> {after} (older messages are deleted)")
    if "max_msg_size" in diff:
        before, after = diff["max_msg_size"]
        if not _unlimited(after) and (_unlimited(before) or after < before):
            found.append(f"stream {name}: max_msg_size lowered {before} -> {after} (larger events are refused)")
    return found


def _unlimited(value: Any) -> bool:
    return value is None or value <= 0


def _subjects_overlap(first: str, second: str) -> bool:
    """Whether two subject filters can match one subject (tokens, with * and > wildcards)."""
    a, b = first.split("."), second.split(".")
    for x, y in zip(a, b, strict=False):
        if ">" in (x, y):
            return True
        if x != y and "*" not in (x, y):
            return False
    return len(a) == len(b)


def declaration_problems(streams: Any, cluster_size: int) -> list[str]:
    """Everything wrong with the declared streams as a whole, for the preflight: each stream's own
    errors, replicas above the cluster size, a name declared twice, subjects two streams share."""
    if not isinstance(streams, list):
        return [f"jetstream_streams_declared: must be a list of streams, got {type(streams).__name__}"]
    problems: list[str] = []
    seen: dict[str, list[str]] = {}
    for spec in streams:
        try:
            config = desired_config(spec)
        except DeclarationError as error:
            problems.append(f"jetstream_streams_declared: {error}")
            continue
        name = config["name"]
        if config["num_replicas"] > cluster_size:
            problems.append(
                f"jetstream_streams_declared: stream {name}: replicas {config['num_replicas']} is more than the "
                f"{cluster_size} cluster members"
            )
        if name in seen:
            problems.append(f"jetstream_streams_declared: stream {name} is declared twice")
            continue
        for other, subjects in seen.items():
            shared = [f"{s} / {t}" for s in config["subjects"] for t in subjects if _subjects_overlap(s, t)]
            if shared:
                problems.append(
                    f"jetstream_streams_declared: streams {other} and {name} overlap in subjects ({', '.join(shared)})"
                )
        seen[name] = config["subjects"]
    return problems
