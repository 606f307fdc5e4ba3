"""Declared JetStream streams (inventory data) in the JetStream API's own form, and what it takes to
get from a stream's current config to the declared one.

Shared by the `jetstream_streams` module (which applies them) and by verify (which checks them),
so both read a declaration the same way. Plain Python, no Ansible imports.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

NANOS = 1_000_000_000
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}

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
CHOICES = {
    "storage": {"file", "memory"},
    "retention": {"limits", "interest", "workqueue"},
    "discard": {"old", "new"},
}
# Limits that drop stored messages when lowered.
RETENTION_LIMITS = ("max_age", "max_bytes", "max_msgs")


class DeclarationError(ValueError):
    """A declared stream that cannot be applied; the message names the stream and the key."""


def parse_size(value: Any) -> int:
    """512MB, 10GB, 1T (1024-based, as nats-server reads them) or a number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"\s*([0-9]+)\s*([KMGT]?)(?:I?B)?\s*", str(value).upper())
    if not match:
        raise ValueError(f"not a size: {value!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def parse_duration(value: Any) -> int:
    """30d, 2m, 1h, 90s, 500ms or a number of seconds -> nanoseconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value * NANOS)
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)\s*", str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r}")
    return int(float(match.group(1)) * _DURATION_UNITS[match.group(2)] * NANOS)


def _convert(name: str, key: str, kind: str, value: Any) -> Any:
    try:
        if kind == "size":
            return parse_size(value)
        if kind == "duration":
            return parse_duration(value)
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"not a whole number: {value!r}")
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"not true/false: {value!r}")
            return value
        if kind == "list":
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"not a list of subjects: {value!r}")
            return sorted(value)
        if key in CHOICES and value not in CHOICES[key]:
            raise ValueError(f"{value!r} is not one of {sorted(CHOICES[key])}")
        return str(value)
    except ValueError as error:
        raise DeclarationError(f"stream {name}: {key}: {error}") from error


def desired_config(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The declared stream as flat API fields ({'num_replicas': 3, 'consumer_limits.inactive_threshold': ns ...})."""
    name = spec.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", name):
        raise DeclarationError(f"stream name {name!r} must be letters, digits, '-' or '_'")
    unknown = sorted(set(spec) - set(FIELDS) - {"name", "consumers"})
    if unknown:
        raise DeclarationError(f"stream {name}: unknown keys {unknown} (known: {sorted(FIELDS)})")
    for required in ("subjects", "storage", "replicas"):
        if required not in spec:
            raise DeclarationError(f"stream {name}: {required} is required")
    config = {"name": name}
    for key, value in spec.items():
        if key in FIELDS:
            api_key, kind = FIELDS[key]
            config[api_key] = _convert(name, key, kind, value)
    return config


def flatten(api_config: Mapping[str, Any]) -> dict[str, Any]:
    """A stream config as the server returns it, flattened to the managed API keys."""
    flat: dict[str, Any] = {}
    for api_key, kind in FIELDS.values():
        head, _, tail = api_key.partition(".")
        value = api_config.get(head)
        if tail:
            value = (value or {}).get(tail)
        if value is None:
            continue
        value = getattr(value, "value", value)  # nats-py hands back enums for storage, retention ...
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
    """{api key: (current, desired)} for every declared key whose value differs."""
    now = flatten(current)
    return {k: (now.get(k), v) for k, v in desired.items() if k != "name" and now.get(k) != v}


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
    return found


def _unlimited(value: Any) -> bool:
    return value is None or value <= 0
