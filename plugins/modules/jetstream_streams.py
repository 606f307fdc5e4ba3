#!/usr/bin/python
"""Ansible module: apply declared JetStream streams (and their durable consumers) to a cluster."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: jetstream_streams
short_description: Apply declared JetStream streams and durable consumers, from the controller
description:
  - Connects to the cluster with nats-py and makes each declared stream match its declaration.
  - Creates missing streams and consumers, updates changed mutable fields in place, and reports a
    diff in check mode. Never deletes a stream or consumer that is not declared.
  - Every declared stream keeps every event unless it declares I(deletes_old_events=true) - the
    keys that decide it are always managed, with these values when left out - retention limits,
    discard new, no max_age, no max_msgs/max_bytes/max_msgs_per_subject, no rollups, deny_delete
    and deny_purge true, no consumer_limits.inactive_threshold. A declaration that would delete
    events without the key is refused before anything is applied.
  - Refuses destructive changes (storage or retention type, fewer replicas, removed subjects,
    lowered max_age/max_bytes/max_msgs/max_msgs_per_subject/max_msg_size) unless
    I(allow_destructive) is set; a storage type change is refused always, because NATS cannot
    change it in place.
  - Every change is checked before any is applied, so a refused declaration changes nothing.
extends_documentation_fragment:
  - jetstream_connection
options:
  streams:
    description:
      - Declared streams. Keys name, subjects, storage, replicas are required; optional keys are
        description, retention, discard, max_age, max_bytes, max_msgs, max_msgs_per_subject,
        max_msg_size, max_consumers, duplicate_window, allow_direct, allow_atomic, allow_rollup,
        deny_delete, deny_purge, consumer_inactive_threshold (durations like 30d/2m/1m30s, sizes
        like 10GB), deletes_old_events (true to allow a declaration that deletes events), and
        consumers (a list of durable consumers).
    type: list
    elements: dict
    required: true
  allow_destructive:
    description: Apply changes that lose data or copies (not a storage type change).
    type: bool
    default: false
  timeout:
    description: Seconds for connecting and for each API call.
    type: float
    default: 5.0
requirements:
  - nats-py on the controller
author: cim-nats-infra
"""

EXAMPLES = r"""
- name: Streams | apply the declared streams
  jetstream_streams:
    servers: "{{ jetstream_streams_servers }}"
    user: "{{ jetstream_streams_user }}"
    password: "{{ jetstream_streams_password }}"
    tls_ca_file: "{{ jetstream_streams_tls_ca_file }}"
    streams:
      - name: INFRASTRUCTURE_EVENTS
        subjects: ["infrastructure.>"]
        storage: file
        replicas: 3
        max_bytes: 10GB
  delegate_to: localhost
  run_once: true
"""

RETURN = r"""
created:
  description: Streams and consumers created (stream or stream/consumer).
  type: list
  returned: always
updated:
  description: Streams and consumers whose declared fields were changed in place.
  type: list
  returned: always
"""

import asyncio
from dataclasses import dataclass, field
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.jetstream_api import CONNECTION_ARGUMENT_SPEC, ConnectError, connect
from ansible.module_utils.jetstream_stream_spec import (
    DeclarationError,
    changes,
    desired_config,
    destructive,
    parse_duration,
    unflatten,
)

try:
    import nats
    from nats.js.api import ConsumerConfig, StreamConfig

    HAS_NATS = True
except ImportError:  # reported by fail_json below
    HAS_NATS = False

CONSUMER_FIELDS = {
    "description": "str",
    "filter_subject": "str",
    "ack_policy": "str",
    "deliver_policy": "str",
    "max_deliver": "int",
    "max_ack_pending": "int",
    "ack_wait": "duration",
    "inactive_threshold": "duration",
}


def consumer_config(stream: str, spec: dict[str, Any]) -> dict[str, Any]:
    name = spec.get("name")
    if not name:
        raise DeclarationError(f"stream {stream}: a consumer needs a name")
    unknown = sorted(set(spec) - set(CONSUMER_FIELDS) - {"name"})
    if unknown:
        raise DeclarationError(f"stream {stream}: consumer {name}: unknown keys {unknown}")
    config: dict[str, Any] = {"durable_name": name, "name": name}
    for key, kind in CONSUMER_FIELDS.items():
        if key in spec:
            config[key] = parse_duration(spec[key]) if kind == "duration" else spec[key]
    return config


@dataclass
class Outcome:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)

    def record(self, label: str, diff: dict[str, tuple[Any, Any]]) -> None:
        self.updated.append(label)
        self.before[label] = {k: v[0] for k, v in diff.items()}
        self.after[label] = {k: v[1] for k, v in diff.items()}


@dataclass
class Planned:
    name: str
    desired: dict[str, Any]
    current: dict[str, Any] | None
    diff: dict[str, tuple[Any, Any]]
    consumers: list[dict[str, Any]]


async def plan(js: Any, streams: list[dict[str, Any]], allow_destructive: bool) -> tuple[list[Planned], list[str]]:
    """What each declared stream needs, and the destructive changes that are refused."""
    planned, refused = [], []
    for spec in streams:
        desired = desired_config(spec)
        name = desired["name"]
        try:
            current = (await js.stream_info(name)).config.as_dict()
        except nats.js.errors.NotFoundError:
            current = None
        diff = changes(current, desired) if current is not None else {}
        harmful = destructive(name, diff)
        if "storage" in diff:
            refused.append(harmful[0] + ": NATS cannot change it in place; migrate through a new stream")
        elif harmful and not allow_destructive:
            refused.extend(harmful)
        planned.append(
            Planned(name, desired, current, diff, [consumer_config(name, c) for c in spec.get("consumers") or []])
        )
    return planned, refused


async def apply(params: dict[str, Any], check_mode: bool) -> dict[str, Any]:
    timeout = params["timeout"]
    nc = await connect(params, timeout)
    try:
        js = nc.jetstream(timeout=timeout)
        planned, refused = await plan(js, params["streams"], params["allow_destructive"])
        if refused:
            return {
                "failed": True,
                "msg": "Refusing destructive changes (allow_destructive=true to apply): " + "; ".join(refused),
            }
        outcome = Outcome()
        for stream in planned:
            if stream.current is None:
                outcome.created.append(stream.name)
                outcome.after[stream.name] = unflatten(stream.desired)
                if not check_mode:
                    await js.add_stream(StreamConfig.from_response(unflatten(stream.desired)))
            elif stream.diff:
                outcome.record(stream.name, stream.diff)
                if not check_mode:
                    merged = dict(stream.current)
                    for key, value in unflatten({k: v[1] for k, v in stream.diff.items()}).items():
                        merged[key] = (merged.get(key) or {}) | value if isinstance(value, dict) else value
                    await js.update_stream(StreamConfig.from_response(merged))
            for consumer in stream.consumers:
                await apply_consumer(js, stream, consumer, check_mode, outcome)
        return {
            "changed": bool(outcome.created or outcome.updated),
            "created": outcome.created,
            "updated": outcome.updated,
            "diff": {"before": outcome.before, "after": outcome.after},
        }
    finally:
        await nc.close()


async def apply_consumer(js: Any, stream: Planned, desired: dict[str, Any], check_mode: bool, outcome: Outcome) -> None:
    label = f"{stream.name}/{desired['name']}"
    current = None
    if stream.current is not None:
        try:
            current = (await js.consumer_info(stream.name, desired["name"])).config.as_dict()
        except nats.js.errors.NotFoundError:
            current = None
    if current is None:
        outcome.created.append(label)
        outcome.after[label] = desired
        if not check_mode:
            await js.add_consumer(stream.name, ConsumerConfig.from_response(dict(desired)))
        return
    diff = {k: (current.get(k), v) for k, v in desired.items() if k != "name" and current.get(k) != v}
    if diff:
        outcome.record(label, diff)
        if not check_mode:
            await js.add_consumer(stream.name, ConsumerConfig.from_response(current | desired))


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **CONNECTION_ARGUMENT_SPEC,
            "streams": {"type": "list", "elements": "dict", "required": True},
            "allow_destructive": {"type": "bool", "default": False},
            "timeout": {"type": "float", "default": 5.0},
        },
        supports_check_mode=True,
    )
    if not HAS_NATS:
        module.fail_json(msg="jetstream_streams needs nats-py on the controller (pip install nats-py)")
    try:
        result = asyncio.run(asyncio.wait_for(apply(module.params, module.check_mode), 60))
    except DeclarationError as error:
        module.fail_json(msg=f"Bad stream declaration: {error}")
    except ConnectError as error:
        module.fail_json(msg=str(error))
    except (nats.errors.Error, OSError, TimeoutError) as error:
        module.fail_json(msg=f"JetStream API: {type(error).__name__}: {error}")
    if result.pop("failed", False):
        module.fail_json(**result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
