"""Declared JetStream streams (inventory data) in the JetStream API's own form, and what it takes to
get from a stream's current config to the declared one.

Shared by the `jetstream_streams` module (which applies them), the preflight filter (which checks
them before any host is touched) and verify (which checks them on the cluster), so all three read a
declaration the same way. Plain Python, no Ansible imports.

The cluster holds an event store: a declared stream keeps every event unless its declaration says
otherwise with `deletes_old_events: true`. Keys that decide whether events are deleted are always
managed, with keep-everything defaults when not declared (no age limit, refuse writes when full,
message delete and purge denied), so leaving a key out never leaves an old deleting setting behind.

What the server refuses or rewrites is checked here, from nats-server's own rules (server/stream.go
checkStreamCfg and configUpdateCheck, server/consumer.go checkConsumerCfg, setConsumerConfigDefaults
and checkNewConsumerConfig), so a declaration the server would refuse is refused before anything is
applied, and a value the server rewrites (0 for "unlimited", a 0 duplicate window) compares equal
to what the server then holds.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

NANOS = 1_000_000_000
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# Nanoseconds per unit: exact integers (floats lose nanoseconds beyond about 104 days).
_DURATION_UNITS = {
    "ns": 1,
    "us": 1000,
    "ms": 1_000_000,
    "s": NANOS,
    "m": 60 * NANOS,
    "h": 3600 * NANOS,
    "d": 86400 * NANOS,
}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|ms|s|m|h|d)")
# The server stores sizes and durations as signed 64-bit integers.
INT64_MAX = (1 << 63) - 1
# nats-server: StreamMaxReplicas, JSMaxNameLen, JSMaxDescriptionLen, the 100 ms floor of max_age and
# duplicate_window, StreamDefaultDuplicatesWindow, JsAckWaitDefault, JsDefaultMaxAckPending.
MAX_REPLICAS = 5
MAX_DESCRIPTION = 4096
MIN_INTERVAL = NANOS // 10
DEFAULT_DUPLICATE_WINDOW = 120 * NANOS
DEFAULT_ACK_WAIT = 30 * NANOS
DEFAULT_MAX_ACK_PENDING = 1000
# Stream and consumer names: the server refuses spaces, '.', '*', '>' (and '/', '\' in consumer names).
NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")
# Subjects a stream may not capture (the JetStream, Raft and system APIs).
RESERVED_SUBJECTS = ("$JS.>", "$JSC.>", "$NRG.>", "$SYS.>")

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
# API key -> declared key, for messages.
DECLARED_KEY = {api: key for key, (api, _) in FIELDS.items()}
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
    "description": "",
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
_DURATIONS = {"max_age", "duplicate_window", "consumer_limits.inactive_threshold"}
_SIZES = {"max_bytes", "max_msg_size"}

# Declared consumer keys -> kind. A declared consumer is durable and pull (no deliver subject).
CONSUMER_FIELDS = {
    "description": "str",
    "filter_subject": "subject",
    "ack_policy": "str",
    "deliver_policy": "str",
    "max_deliver": "int",
    "max_ack_pending": "int",
    "ack_wait": "duration",
    "inactive_threshold": "duration",
}
CONSUMER_CHOICES = {
    "ack_policy": {"explicit", "all", "none"},
    "deliver_policy": {"all", "last", "new", "last_per_subject"},
}
# Consumer settings the server never changes on an existing consumer (checkNewConsumerConfig).
CONSUMER_FIXED = ("ack_policy", "deliver_policy")
# What the server holds for a consumer key it leaves out.
CONSUMER_DEFAULTS: dict[str, Any] = {
    "description": "",
    "filter_subject": "",
    "deliver_policy": "all",
    "ack_policy": "none",
    "max_deliver": -1,
    "max_ack_pending": 0,
    "ack_wait": 0,
    "inactive_threshold": 0,
}


class DeclarationError(ValueError):
    """A declared stream that cannot be applied; the message names the stream and the key."""


def parse_size(value: Any) -> int:
    """512MB, 10GB, 1T (K, M, G, T with or without B, all 1024-based) or a number of bytes; -1 =
    unlimited. For declared streams; a nats-server config value is read by parse_server_size."""
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


def parse_server_size(value: Any) -> int:
    """A size as nats-server's config parser reads it (conf/parse.go): K, M, G, T are 1000-based,
    KB, MB, GB, TB (and KiB ...) 1024-based; a plain number is bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"\s*([0-9]+)\s*([kmgtpe]?)(b|i|ib)?\s*", str(value).lower())
    if not match:
        raise ValueError(f"not a size: {value!r}")
    power = " kmgtpe".index(match.group(2) or " ")
    base = 1024 if match.group(3) else 1000
    return int(match.group(1)) * int(base**power)


def parse_duration(value: Any) -> int:
    """30d, 2m, 1h, 90s, 500ms, Go-style 1m30s or a number of seconds -> nanoseconds (never negative)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"negative duration: {value!r}")
        nanos = int(Fraction(str(value)) * NANOS)
    else:
        text = str(value).strip()
        if not text or not re.fullmatch(f"(?:{_DURATION_PART.pattern})+", text):
            raise ValueError(f"not a duration: {value!r}")
        nanos = round(sum(Fraction(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text)))
    if nanos > INT64_MAX:
        raise ValueError(f"duration out of range: {value!r}")
    return nanos


def human_duration(nanos: int) -> str:
    """Nanoseconds as parse_duration reads them back: 30d, 1m30s, 500ms, 0s."""
    parts = []
    rest = nanos
    for unit, size in (("d", 86400 * NANOS), ("h", 3600 * NANOS), ("m", 60 * NANOS), ("s", NANOS)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    for unit, size in (("ms", 1_000_000), ("us", 1000), ("ns", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts) or "0s"


def human_size(number: int) -> str:
    """Bytes as 10GB, 512MB (exact when it divides), else 1.5GB; 1024-based like parse_size."""
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if number >= size and number % size == 0:
            return f"{number // size}{unit}"
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if number >= size:
            return f"{number / size:.1f}{unit}"
    return f"{number}B"


def show(api_key: str, value: Any) -> str:
    """A setting's value for a message: durations and sizes in words, never nanoseconds."""
    if value is None:
        return "none"
    if api_key in _DURATIONS and isinstance(value, int):
        return human_duration(value) if value > 0 else "none"
    if api_key in _SIZES and isinstance(value, int):
        return human_size(value) if value > 0 else "unlimited"
    if api_key in (*RETENTION_LIMITS, "max_consumers") and isinstance(value, int) and value <= 0:
        return "unlimited"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def subject_problem(subject: Any) -> str | None:
    """Why a subject (or filter) is not one NATS takes; None when it is."""
    if not isinstance(subject, str) or not subject:
        return f"{subject!r} is not a subject"
    tokens = subject.split(".")
    if any(not t or any(c.isspace() for c in t) for t in tokens):
        return f"{subject!r} is not a subject (empty token or white space)"
    if any(len(t) > 1 and ("*" in t or ">" in t) for t in tokens):
        return f"{subject!r}: wildcards '*' and '>' must be whole tokens"
    if ">" in tokens[:-1]:
        return f"{subject!r}: '>' must be the last token"
    return None


def _check_subjects(name: str, subjects: list[str]) -> None:
    for subject in subjects:
        problem = subject_problem(subject)
        if problem:
            raise DeclarationError(f"stream {name}: subjects: {problem}")
        if subject == ">":
            raise DeclarationError(f"stream {name}: subjects: '>' would capture every subject, the APIs' too")
        reserved = [r for r in RESERVED_SUBJECTS if _subjects_overlap(subject, r)]
        if reserved:
            raise DeclarationError(f"stream {name}: subjects: {subject!r} overlaps the NATS API subjects {reserved[0]}")
    for i, subject in enumerate(subjects):
        for other in subjects[i + 1 :]:
            if subject == other:
                raise DeclarationError(f"stream {name}: subjects: {subject!r} is listed twice")
            if _subjects_overlap(subject, other):
                raise DeclarationError(
                    f"stream {name}: subjects: {subject!r} overlaps {other!r} (the server refuses it)"
                )


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"not a whole number: {value!r}")
    if value < -1 or value > INT64_MAX:
        raise ValueError(f"out of range: {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"not true/false: {value!r}")
    return value


def _subject_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"not a list of subjects: {value!r}")
    return sorted(value)


def _subject(value: Any) -> str:
    problem = subject_problem(value)
    if problem:
        raise ValueError(problem)
    return str(value)


_CONVERTERS = {
    "size": parse_size,
    "duration": parse_duration,
    "int": _whole,
    "bool": _bool,
    "list": _subject_list,
    "subject": _subject,
}


def _convert(name: str, key: str, kind: str, value: Any, choices: Mapping[str, set[str]] = CHOICES) -> Any:
    """A declared value in API form, or DeclarationError naming `name` (stream or consumer) and the key."""
    try:
        if kind in _CONVERTERS:
            return _CONVERTERS[kind](value)
        if not isinstance(value, str):
            raise ValueError(f"not a string: {value!r}")
        if key in choices and value not in choices[key]:
            raise ValueError(f"{value!r} is not one of {sorted(choices[key])}")
        if len(value) > MAX_DESCRIPTION:
            raise ValueError(f"longer than {MAX_DESCRIPTION} characters")
        return value
    except ValueError as error:
        hint = " (use e.g. 500ms, 90s, 2m, 1h30m, 30d)" if str(error).startswith("not a duration") else ""
        raise DeclarationError(f"{name}: {key}: {error}{hint}") from error


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
            for key in ("max_bytes", "max_msgs")
            if config.get(key, -1) > 0
        )
    # Whatever the discard policy: the server removes a subject's oldest events beyond the count
    # (filestore enforceMsgPerSubjectLimit; only discard_new_per_subject, not managed here, refuses).
    if config.get("max_msgs_per_subject", -1) > 0:
        ways.append("max_msgs_per_subject deletes a subject's oldest events beyond that count, even with discard new")
    if config.get("allow_rollup_hdrs"):
        ways.append("allow_rollup lets a publisher delete a subject's earlier events")
    if not config.get("deny_delete", False):
        ways.append("deny_delete false lets clients delete events")
    if not config.get("deny_purge", False):
        ways.append("deny_purge false lets clients purge the stream")
    return ways


def _known(unknown: list[str], known: list[str]) -> str:
    """' (did you mean ack_wait?)' for a likely typo, else where the keys are listed."""
    close = [m for key in unknown for m in difflib.get_close_matches(str(key), known, n=1)]
    return f" (did you mean {', '.join(close)}?)" if close else " (the keys: docs/streams.md)"


def _stream_name(spec: Any) -> str:
    if not isinstance(spec, Mapping):
        raise DeclarationError(f"a declared stream must be a mapping with name, subjects ...: got {spec!r:.80}")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise DeclarationError(f"stream name {name!r:.80} must be 1-255 letters, digits, '-' or '_'")
    return name


def _check_intervals(name: str, config: Mapping[str, Any]) -> None:
    """What the server refuses of max_age and duplicate_window (checkStreamCfg)."""
    for key in ("max_age", "duplicate_window"):
        value = config.get(key, 0)
        if 0 < value < MIN_INTERVAL:
            raise DeclarationError(f"stream {name}: {key}: {human_duration(value)} is below the server's 100ms minimum")
    max_age, window = config.get("max_age", 0), config.get("duplicate_window", 0)
    if max_age > 0 and window > max_age:
        raise DeclarationError(
            f"stream {name}: duplicate_window {human_duration(window)} is longer than max_age "
            f"{human_duration(max_age)}: the server refuses it (a retry is known only while its first copy is kept)"
        )


def desired_config(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The declared stream as flat API fields ({'num_replicas': 3, 'consumer_limits.inactive_threshold': ns ...}),
    with the keep-every-event defaults for the deletion keys it leaves out. Refuses a declaration
    that would delete events unless it says `deletes_old_events: true`, and one the server refuses."""
    name = _stream_name(spec)
    unknown = sorted(set(spec) - set(FIELDS) - META_KEYS)
    if unknown:
        raise DeclarationError(f"stream {name}: unknown keys {unknown}{_known(unknown, [*FIELDS, *META_KEYS])}")
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
            config[api_key] = _convert(f"stream {name}", key, kind, value)
    replicas = config["num_replicas"]
    if not 1 <= replicas <= MAX_REPLICAS:
        raise DeclarationError(f"stream {name}: replicas: must be 1 to {MAX_REPLICAS}, got {replicas}")
    _check_subjects(name, config["subjects"])
    _check_intervals(name, config)
    if config.get("duplicate_window") == 0:
        # What the server stores for 0: its 2 minute default, or max_age when that is shorter.
        max_age = config["max_age"]
        config["duplicate_window"] = min(DEFAULT_DUPLICATE_WINDOW, max_age) if max_age > 0 else DEFAULT_DUPLICATE_WINDOW
    if config["allow_rollup_hdrs"] and config["deny_purge"]:
        raise DeclarationError(
            f"stream {name}: allow_rollup needs deny_purge false (roll-ups purge; the server refuses)"
        )
    ways = event_deletion(config)
    if ways and not deletes:
        raise DeclarationError(
            f"stream {name} would delete events ({'; '.join(ways)}): an event store keeps them. Remove those "
            "settings, or declare deletes_old_events: true if this stream may delete events on purpose"
        )
    return config


def declared_consumers(spec: Mapping[str, Any], stream: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The durable consumers a declared stream lists, as API consumer configs (the values the server
    then holds: ack_policy explicit unless declared, 0s made the server's defaults). `stream` is the
    stream's desired_config. Refuses what the server refuses, naming the stream and the consumer."""
    name = stream["name"]
    declared = spec.get("consumers") or []
    if not isinstance(declared, list):
        raise DeclarationError(f"stream {name}: consumers: must be a list of consumers, got {_kind(declared)}")
    configs: list[dict[str, Any]] = []
    for item in declared:
        if not isinstance(item, Mapping):
            raise DeclarationError(f"stream {name}: consumers: each must be a mapping with a name, got {item!r:.80}")
        consumer = item.get("name")
        if not isinstance(consumer, str) or not NAME.fullmatch(consumer):
            raise DeclarationError(
                f"stream {name}: consumer name {consumer!r:.80} must be 1-255 letters, digits, '-' or '_'"
            )
        label = f"stream {name}: consumer {consumer}"
        if any(c["name"] == consumer for c in configs):
            raise DeclarationError(f"{label} is declared twice")
        unknown = sorted(set(item) - set(CONSUMER_FIELDS) - {"name"})
        if unknown:
            raise DeclarationError(f"{label}: unknown keys {unknown}{_known(unknown, [*CONSUMER_FIELDS, 'name'])}")
        config: dict[str, Any] = {"name": consumer, "durable_name": consumer, "ack_policy": "explicit"}
        for key, kind in CONSUMER_FIELDS.items():
            if key in item:
                config[key] = _convert(label, key, kind, item[key], CONSUMER_CHOICES)
        configs.append(_consumer_server_values(label, config, stream))
    return configs


def _consumer_server_values(label: str, config: dict[str, Any], stream: Mapping[str, Any]) -> dict[str, Any]:
    """checkConsumerCfg's refusals, and setConsumerConfigDefaults' rewrites of 0 values."""
    filter_subject = config.get("filter_subject")
    if filter_subject and not any(_subjects_overlap(filter_subject, s) for s in stream["subjects"]):
        raise DeclarationError(
            f"{label}: filter_subject {filter_subject!r} matches none of the stream's subjects {stream['subjects']}"
        )
    if config.get("deliver_policy") == "last_per_subject" and not filter_subject:
        raise DeclarationError(f"{label}: deliver_policy last_per_subject needs a filter_subject")
    acks = config["ack_policy"] != "none"
    if not acks and stream.get("retention") == "workqueue":
        raise DeclarationError(f"{label}: ack_policy none: a workqueue stream's consumers must acknowledge")
    if config.get("ack_wait") == 0 and acks:
        config["ack_wait"] = DEFAULT_ACK_WAIT
    if config.get("max_ack_pending") == 0 and acks:
        config["max_ack_pending"] = DEFAULT_MAX_ACK_PENDING
    if "max_deliver" in config and config["max_deliver"] <= 0:
        config["max_deliver"] = -1
    stream_default = stream.get("consumer_limits.inactive_threshold", 0)
    own = config.get("inactive_threshold", 0)
    if stream_default > 0 and own > stream_default:
        raise DeclarationError(
            f"{label}: inactive_threshold {human_duration(own)} is longer than the stream's "
            f"consumer_inactive_threshold {human_duration(stream_default)} (the server refuses it)"
        )
    if "inactive_threshold" in config and own == 0:
        config["inactive_threshold"] = stream_default
    return config


def consumer_changes(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (current, desired)} for every declared consumer key whose value differs (the server's
    config as CONSUMER.INFO returns it)."""
    diff = {}
    for key, want in desired.items():
        if key in ("name", "durable_name"):
            continue
        now = current.get(key)
        if now is None:
            now = CONSUMER_DEFAULTS.get(key)
        if key == "max_deliver" and isinstance(now, int) and now <= 0:
            now = -1
        if now != want:
            diff[key] = (now, want)
    return diff


def consumer_refusals(label: str, diff: Mapping[str, tuple[Any, Any]]) -> list[str]:
    """Changes the server never makes to an existing consumer."""
    return [
        f"{label}: {key} {diff[key][0]} -> {diff[key][1]}: the server cannot change it on an existing consumer "
        "(declare a consumer with another name)"
        for key in CONSUMER_FIXED
        if key in diff
    ]


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
    """A stream config as the server returns it (raw JSON or nats-py's as_dict), flattened to the
    managed API keys; a key the server left out takes the value the server means by that."""
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


def _lowered(before: Any, after: Any) -> bool:
    """A limit made tighter: set where there was none, or made smaller (0 and -1 are unlimited)."""
    return not _unlimited(after) and (_unlimited(before) or after < before)


def _usage_note(key: str, after: int, state: Mapping[str, Any] | None) -> str:
    """', below the 3.2GB it holds' when the stream already holds more than the new limit."""
    used = {"max_bytes": "bytes", "max_msgs": "messages"}.get(key)
    if not state or not used or int(state.get(used) or 0) <= after:
        return ""
    held = int(state[used])
    shown = human_size(held) if used == "bytes" else f"{held} messages"
    return f", below the {shown} it holds"


_LOWERED = {
    "max_age": "older events are deleted",
    "max_bytes": "with discard old the oldest events are deleted, with discard new writes are refused sooner",
    "max_msgs": "with discard old the oldest events are deleted, with discard new writes are refused sooner",
    "max_msgs_per_subject": "a subject's oldest events beyond it are deleted",
}


def destructive(
    name: str,
    diff: Mapping[str, tuple[Any, Any]],
    state: Mapping[str, Any] | None = None,
    current: Mapping[str, Any] | None = None,
) -> list[str]:
    """The changes that lose data or copies, or start refusing reads or writes, each said in words.
    `state` is the stream's STREAM.INFO state (for what a lowered limit goes below), `current` its
    flattened config (for the limits a discard change meets). A storage type change is not among
    them: the server cannot make it at all (`impossible`)."""
    found = []
    if "retention" in diff:
        found.append(f"stream {name}: retention {diff['retention'][0]} -> {diff['retention'][1]}")
    if "num_replicas" in diff and (diff["num_replicas"][0] or 0) > diff["num_replicas"][1]:
        found.append(f"stream {name}: replicas {diff['num_replicas'][0]} -> {diff['num_replicas'][1]} (fewer copies)")
    if "subjects" in diff:
        removed = sorted(set(diff["subjects"][0] or []) - set(diff["subjects"][1]))
        if removed:
            found.append(f"stream {name}: subjects removed {removed} (their messages stop being stored)")
    for key in RETENTION_LIMITS:
        if key in diff and _lowered(*diff[key]):
            before, after = diff[key]
            found.append(
                f"stream {name}: {key} lowered {show(key, before)} -> {show(key, after)}"
                f"{_usage_note(key, after, state)} ({_LOWERED[key]})"
            )
    why = {
        "max_msg_size": "larger events are refused",
        "max_consumers": "consumers beyond it are refused, and with them reads",
        "consumer_limits.inactive_threshold": "idle consumers that set none are deleted sooner, longer ones refused",
    }
    for key, words in why.items():
        if key in diff and _lowered(*diff[key]):
            before, after = diff[key]
            found.append(
                f"stream {name}: {DECLARED_KEY[key]} lowered {show(key, before)} -> {show(key, after)} ({words})"
            )
    turned_off = {"allow_direct": "direct gets are refused", "allow_atomic": "atomic batch appends are refused"}
    for key, words in turned_off.items():
        if key in diff and diff[key][0] and not diff[key][1]:
            found.append(f"stream {name}: {key} true -> false ({words})")
    # The limits the stream will have: changed ones from the diff, the others as they are.
    limits = dict(current or {}) | {k: v[1] for k, v in diff.items()}
    if diff.get("discard", (None, None))[1] == "old" and any(limits.get(k, -1) > 0 for k in ("max_bytes", "max_msgs")):
        found.append(f"stream {name}: discard new -> old (the oldest events are deleted when the stream is full)")
    if diff.get("allow_rollup_hdrs", (None, False))[1]:
        found.append(f"stream {name}: allow_rollup false -> true (a publisher can then delete a subject's events)")
    return found


def impossible(name: str, diff: Mapping[str, tuple[Any, Any]], current: Mapping[str, Any]) -> list[str]:
    """Changes the server refuses on an existing stream (configUpdateCheck), whatever the allowance."""
    found = []
    if "storage" in diff:
        found.append(
            f"stream {name}: storage {diff['storage'][0]} -> {diff['storage'][1]}: NATS cannot change it in place; "
            "migrate through a new stream"
        )
    if "retention" in diff and "workqueue" in diff["retention"]:
        found.append(
            f"stream {name}: retention {diff['retention'][0]} -> {diff['retention'][1]}: the server cannot change "
            "retention to or from workqueue"
        )
    for key in ("deny_delete", "deny_purge"):
        if key in diff and diff[key][0] and not diff[key][1]:
            found.append(f"stream {name}: {key} true -> false: the server never turns it off on an existing stream")
    max_age = diff["max_age"][1] if "max_age" in diff else int(current.get("max_age") or 0)
    window = diff["duplicate_window"][1] if "duplicate_window" in diff else int(current.get("duplicate_window") or 0)
    if diff and 0 < max_age < window:
        found.append(
            f"stream {name}: its duplicate_window {human_duration(window)} would be longer than max_age "
            f"{human_duration(max_age)} (the server refuses it): declare a duplicate_window of at most that"
        )
    if diff and current.get("sealed"):
        found.append(f"stream {name} is sealed: the server refuses every change to it (and every write)")
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


def _kind(value: Any) -> str:
    """A YAML reader's word for a value's type (Ansible hands over its own subclasses)."""
    for kind, word in ((Mapping, "a mapping"), (str, "a string"), (bool, "a boolean"), (int, "a number")):
        if isinstance(value, kind):
            return word
    return "nothing" if value is None else "a " + type(value).__name__


def stream_problems(
    streams: Any, cluster_size: int | None = None
) -> tuple[list[str], list[tuple[dict[str, Any], Any]]]:
    """Everything wrong with the declared streams as a whole, each problem naming its stream: each
    stream's own errors and its consumers', replicas above the cluster size (when known), a name
    declared twice, subjects two streams share. Also the streams that read well: (config, spec)."""
    if not isinstance(streams, list):
        return [f"must be a list of streams, got {_kind(streams)} {streams!r:.60}"], []
    problems: list[str] = []
    good: list[tuple[dict[str, Any], Any]] = []
    seen: dict[str, list[str]] = {}
    for spec in streams:
        try:
            config = desired_config(spec)
            declared_consumers(spec, config)
        except DeclarationError as error:
            problems.append(str(error))
            continue
        name = config["name"]
        if cluster_size is not None and config["num_replicas"] > cluster_size:
            problems.append(
                f"stream {name}: replicas {config['num_replicas']} is more than the {cluster_size} cluster members"
            )
        if name in seen:
            problems.append(f"stream {name} is declared twice")
            continue
        for other, subjects in seen.items():
            shared = [f"{s} / {t}" for s in config["subjects"] for t in subjects if _subjects_overlap(s, t)]
            if shared:
                problems.append(f"streams {other} and {name} overlap in subjects ({', '.join(shared)})")
        seen[name] = config["subjects"]
        good.append((config, spec))
    return problems, good


# Storage type -> (account limit key, node variable), for the limits checks.
_STORES = {
    "file": ("max_file", "nats_server_jetstream_max_file_store"),
    "memory": ("max_memory", "nats_server_jetstream_max_memory_store"),
}
_ACCOUNT = "nats_server_app_jetstream_limits"


def _limit(value: Any, parse: Any = parse_server_size) -> int | None:
    """A configured limit in bytes or a count; None when unset, unlimited or unreadable (the
    server preflight reports an unreadable one)."""
    if value is None or value == "":
        return None
    try:
        number = int(parse(value))
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _count(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    return int(value)


def limit_problems(
    good: Sequence[tuple[Mapping[str, Any], Any]], account: Any, nodes: Sequence[Mapping[str, Any]]
) -> list[str]:
    """The declared streams against the account's JetStream limits and each node's store limits.

    From nats-server (jetstream.go checkBytesLimits, accountReservation; the account limits here are
    not tiered): a stream with max_bytes reserves max_bytes x replicas of the account's max_file
    (max_memory for memory storage), all streams' reservations together; each replica reserves
    max_bytes of the max_file_store of the node holding it. A stream without max_bytes reserves
    nothing: it grows until the account or a node is full, and then its writes (and every other
    stream's) are refused, so each declared stream must say its max_bytes."""
    if not isinstance(account, Mapping):
        return [f"{_ACCOUNT} is not known here: the streams cannot be checked against the limits"]
    problems = []
    max_streams = _limit(account.get("max_streams"), _count)
    if max_streams is not None and len(good) > max_streams:
        problems.append(f"{len(good)} streams declared, more than {_ACCOUNT}.max_streams {max_streams}")
    for storage, (account_key, node_key) in _STORES.items():
        streams = [c for c, _ in good if c["storage"] == storage]
        if streams:
            problems += _store_problems(
                storage, streams, account=account, account_key=account_key, nodes=nodes, node_key=node_key
            )
    max_consumers = _limit(account.get("max_consumers"), _count)
    for config, spec in good:
        problems += _consumer_count_problems(config, spec, max_consumers)
    return problems


def _store_problems(
    storage: str,
    streams: Sequence[Mapping[str, Any]],
    *,
    account: Mapping[str, Any],
    account_key: str,
    nodes: Sequence[Mapping[str, Any]],
    node_key: str,
) -> list[str]:
    problems = []
    account_bytes = _limit(account.get(account_key))
    stores = {str(n.get("host")): _limit(n.get(node_key)) for n in nodes}
    known = {host: size for host, size in stores.items() if size is not None}
    for config in streams:
        name, size, replicas = config["name"], config["max_bytes"], config["num_replicas"]
        if size <= 0:
            problems.append(
                f"stream {name}: no max_bytes: a stream without one reserves nothing and grows until the account "
                f"({_ACCOUNT}.{account_key}) or a node ({node_key}) is full, then writes are refused; declare max_bytes"
            )
            continue
        if account_bytes is not None and size * replicas > account_bytes:
            problems.append(
                f"stream {name}: max_bytes {human_size(size)} x {replicas} replicas is more than "
                f"{_ACCOUNT}.{account_key} {account[account_key]} (the account reserves max_bytes on each replica)"
            )
        fitting = [host for host, store in known.items() if store >= size]
        # More replicas than nodes is the cluster size's problem (stream_problems), not the stores'.
        if known and len(fitting) < min(replicas, len(known)):
            small = sorted(host for host in known if host not in fitting)
            problems.append(
                f"stream {name}: max_bytes {human_size(size)} is more than {node_key} of {', '.join(small)}: "
                f"its {replicas} replicas need {replicas} nodes with that much"
            )
    sized = [c for c in streams if c["max_bytes"] > 0]
    total = sum(c["max_bytes"] * c["num_replicas"] for c in sized)
    if account_bytes is not None and len(sized) > 1 and total > account_bytes:
        problems.append(
            f"the declared {storage} streams reserve {human_size(total)} (max_bytes x replicas), more than "
            f"{_ACCOUNT}.{account_key} {account[account_key]}"
        )
    if known and len(known) == len(stores):
        everywhere = sum(c["max_bytes"] for c in sized if c["num_replicas"] >= len(known))
        smallest = min(known.values())
        if len(sized) > 1 and everywhere > smallest:
            problems.append(
                f"the declared {storage} streams with a replica on every node reserve {human_size(everywhere)} on "
                f"each, more than {node_key} {human_size(smallest)}"
            )
        elif len(sized) > 1 and total > sum(known.values()):
            problems.append(
                f"the declared {storage} streams reserve {human_size(total)} across the nodes, more than their "
                f"{node_key} together ({human_size(sum(known.values()))})"
            )
    return problems


def _consumer_count_problems(
    config: Mapping[str, Any], spec: Mapping[str, Any], max_consumers: int | None
) -> list[str]:
    name, declared = config["name"], len(spec.get("consumers") or [])
    own = config.get("max_consumers", -1)
    problems = []
    if max_consumers is not None and own > max_consumers:
        problems.append(
            f"stream {name}: max_consumers {own} is more than {_ACCOUNT}.max_consumers {max_consumers} "
            "(the server refuses the stream)"
        )
    for limit, what in ((own if own > 0 else None, "its max_consumers"), (max_consumers, f"{_ACCOUNT}.max_consumers")):
        if limit is not None and declared > limit:
            problems.append(f"stream {name}: {declared} consumers declared, more than {what} {limit}")
    return problems


def _reservation(configs: Sequence[Mapping[str, Any]], storage: str) -> int:
    """What streams reserve of an account's store: max_bytes x replicas, unlimited ones nothing."""
    return sum(
        max(int(c.get("max_bytes") or 0), 0) * int(c.get("num_replicas") or 1)
        for c in configs
        if getattr(c.get("storage"), "value", c.get("storage")) == storage
    )


def account_problems(
    limits: Mapping[str, Any], existing: Sequence[Mapping[str, Any]], declared: Sequence[Mapping[str, Any]]
) -> list[str]:
    """The account's JetStream limits as the server reports them ($JS.API.INFO `limits`) against
    its streams as they will be: every stream it has (STREAM.LIST configs), the declared ones as
    declared. Only what the declaration makes worse is reported (a limit already exceeded by
    streams nobody declared is not this run's to refuse)."""
    before = {str(c.get("name")): c for c in existing}
    after = dict(before) | {str(c["name"]): c for c in declared}
    problems = []
    max_streams = int(limits.get("max_streams") or -1)
    new = sorted(set(after) - set(before))
    if new and 0 < max_streams < len(after):
        problems.append(
            f"streams {', '.join(new)}: the account would hold {len(after)} streams, more than its "
            f"max_streams {max_streams} ({_ACCOUNT})"
        )
    for storage, key in (("file", "max_storage"), ("memory", "max_memory")):
        limit = int(limits.get(key) or -1)
        reserved, then = _reservation(list(before.values()), storage), _reservation(list(after.values()), storage)
        if limit <= 0 or then <= limit or then <= reserved:
            continue
        growing = [
            str(c["name"])
            for c in declared
            if _reservation([c], storage) > _reservation([before[c["name"]]] if c["name"] in before else [], storage)
        ]
        problems.append(
            f"streams {', '.join(growing)}: the account's {storage} streams would reserve {human_size(then)} "
            f"(max_bytes x replicas), more than its {key} {human_size(limit)} ({_ACCOUNT}.max_"
            f"{'file' if storage == 'file' else 'memory'}); the server would refuse them"
        )
    return problems


def declaration_problems(
    streams: Any, cluster_size: int, account: Any = None, nodes: Sequence[Mapping[str, Any]] | None = None
) -> list[str]:
    """Everything wrong with the declared streams, for the preflight, each prefixed with the
    variable: stream_problems, then (when `account`/`nodes` are given) limit_problems."""
    problems, good = stream_problems(streams, cluster_size)
    if nodes is not None:
        problems += limit_problems(good, account, nodes)
    return [f"jetstream_streams_declared: {p}" for p in problems]
