#!/usr/bin/python
"""Ansible module: apply declared JetStream streams (and their durable consumers) to a cluster."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: jetstream_streams
short_description: Apply declared JetStream streams and durable consumers, from the controller
description:
  - Connects to the cluster and makes each declared stream match its declaration, speaking the
    JetStream API's JSON (an update sends the server's own config back with the declared fields
    changed, so no field the module does not manage is lost).
  - Creates missing streams and consumers, updates changed mutable fields in place, and reports a
    diff in check mode. Never deletes a stream or consumer that is not declared.
  - Every declared stream keeps every event unless it declares I(deletes_old_events=true) - the
    keys that decide it are always managed, with these values when left out - retention limits,
    discard new, no max_age, no max_msgs/max_bytes/max_msgs_per_subject, no rollups, deny_delete
    and deny_purge true, no consumer_limits.inactive_threshold.
  - All or nothing, in three steps. First every declaration is read (a bad one, a name declared
    twice, subjects two streams share, what the server would refuse); then every stream and
    consumer is read from the server and every change worked out; only if none is refused is any
    applied. A server refusal while applying stops there, naming the stream and what was applied
    before it.
  - Refuses destructive changes unless I(allow_destructive) is set - fewer replicas, removed
    subjects, another retention, lowered max_age/max_bytes/max_msgs/max_msgs_per_subject (also
    below what the stream holds), lowered max_msg_size/max_consumers/consumer_inactive_threshold,
    allow_direct or allow_atomic turned off, discard old with a size or count limit, rollups
    allowed. Refuses always what the server cannot change - the storage type, retention to or from
    workqueue, deny_delete or deny_purge turned off, a sealed stream, ack_policy or deliver_policy
    of an existing consumer.
  - Every error names the stream (and the consumer), server errors as C(stream X - description
    (err_code N)).
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
        consumers (durable pull consumers - name, description, filter_subject, ack_policy
        (explicit unless declared), deliver_policy, max_deliver, max_ack_pending, ack_wait,
        inactive_threshold). Each must be a mapping; one that is not is refused with the others.
    type: list
    elements: raw
    required: true
  allow_destructive:
    description: Apply changes that lose data or copies, or that refuse reads or writes sooner.
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
  description: Streams and consumers created (stream or stream/consumer; in check mode, that would be).
  type: list
  returned: always
updated:
  description: Streams and consumers whose declared fields were changed in place.
  type: list
  returned: always
"""

import asyncio
import copy
from dataclasses import dataclass, field
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.jetstream_api import CONNECTION_ARGUMENT_SPEC, ApiError, ConnectError, api, connect, paged
from ansible.module_utils.jetstream_stream_spec import (
    DeclarationError,
    account_problems,
    changes,
    consumer_changes,
    consumer_refusals,
    declared_consumers,
    destructive,
    flatten,
    impossible,
    stream_problems,
    unflatten,
)

try:
    import nats

    HAS_NATS = True
except ImportError:  # reported by fail_json below
    HAS_NATS = False

JS = "$JS.API"
STREAM_NOT_FOUND = 10059
CONSUMER_NOT_FOUND = 10014
# The whole run, reading and applying included.
RUN_TIMEOUT = 60.0


class Refused(Exception):
    """A declaration or a change that is not applied; the message names the stream."""


def server_said(error: ApiError) -> str:
    """The server's description and err_code, without the API subject ApiError puts first."""
    return str(error).split(": ", 1)[-1]


@dataclass
class Consumer:
    stream: str
    name: str
    desired: dict[str, Any]
    current: dict[str, Any] | None
    diff: dict[str, tuple[Any, Any]]

    @property
    def label(self) -> str:
        return f"{self.stream}/{self.name}"


@dataclass
class Planned:
    name: str
    desired: dict[str, Any]
    current: dict[str, Any] | None  # the server's config, as STREAM.INFO returns it
    diff: dict[str, tuple[Any, Any]]
    consumers: list[Consumer]


@dataclass
class Outcome:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    applied: list[str] = field(default_factory=list)  # what the server has taken, in order

    def record(self, label: str, diff: dict[str, tuple[Any, Any]]) -> None:
        self.updated.append(label)
        self.before[label] = {k: v[0] for k, v in diff.items()}
        self.after[label] = {k: v[1] for k, v in diff.items()}

    def so_far(self) -> str:
        return f"applied before it: {', '.join(self.applied) or 'nothing'}"


def read_declarations(streams: Any) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Every declared stream and its consumers in API form, or Refused naming every bad one."""
    problems, good = stream_problems(streams)
    if problems:
        raise Refused("Bad stream declaration, nothing applied: " + " | ".join(problems))
    return [(config, declared_consumers(spec, config)) for config, spec in good]


async def request(nc: Any, label: str, subject: str, payload: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    """One API request; ApiError becomes Refused naming the stream (or stream/consumer)."""
    try:
        answer: dict[str, Any] = await api(nc, subject, payload, timeout)
        return answer
    except ApiError as error:
        raise Refused(f"{label}: {server_said(error)}") from error


async def info(nc: Any, label: str, subject: str, missing: int, timeout: float) -> dict[str, Any] | None:
    """STREAM.INFO or CONSUMER.INFO; None when it does not exist."""
    try:
        answer: dict[str, Any] = await api(nc, subject, None, timeout)
        return answer
    except ApiError as error:
        if error.err_code == missing:
            return None
        raise Refused(f"{label}: {server_said(error)}") from error


async def plan(
    nc: Any, declared: list[tuple[dict[str, Any], list[dict[str, Any]]]], allow_destructive: bool, timeout: float
) -> tuple[list[Planned], list[str], list[str]]:
    """What each declared stream needs; the changes the server cannot make; the destructive ones."""
    planned: list[Planned] = []
    cannot: list[str] = []
    harmful: list[str] = []
    for desired, consumers in declared:
        name = desired["name"]
        found = await info(nc, f"stream {name}", f"{JS}.STREAM.INFO.{name}", STREAM_NOT_FOUND, timeout)
        current = found["config"] if found else None
        diff = changes(current, desired) if current is not None else {}
        if found is not None:
            cannot += impossible(name, diff, found["config"])
            harmful += destructive(name, diff, found.get("state"), flatten(found["config"]))
        stream = Planned(name, desired, current, diff, [])
        for wanted in consumers:
            stream.consumers.append(await plan_consumer(nc, stream, wanted, timeout))
            cannot += consumer_refusals(f"stream {name}: consumer {wanted['name']}", stream.consumers[-1].diff)
        planned.append(stream)
    cannot += await account_check(nc, planned, timeout)
    return planned, cannot, [] if allow_destructive else harmful


async def account_check(nc: Any, planned: list[Planned], timeout: float) -> list[str]:
    """The account's limits (as the server reports them) against its streams after the changes,
    so that a stream the server would refuse for want of room stops the run before any change."""
    try:
        limits = (await api(nc, f"{JS}.INFO", None, timeout)).get("limits") or {}
        existing, _ = await paged(nc, f"{JS}.STREAM.LIST", "streams", timeout)
    except ApiError as error:
        raise Refused(f"the account's JetStream limits: {server_said(error)}") from error
    configs = [s.get("config") or {} for s in existing]
    problems: list[str] = account_problems(limits, configs, [s.desired for s in planned])
    return problems


async def plan_consumer(nc: Any, stream: Planned, desired: dict[str, Any], timeout: float) -> Consumer:
    name = desired["name"]
    current = None
    if stream.current is not None:
        subject = f"{JS}.CONSUMER.INFO.{stream.name}.{name}"
        found = await info(nc, f"stream {stream.name}: consumer {name}", subject, CONSUMER_NOT_FOUND, timeout)
        current = found["config"] if found else None
    diff = consumer_changes(current, desired) if current is not None else {}
    return Consumer(stream.name, name, desired, current, diff)


def merged(current: dict[str, Any], diff: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """The server's own config with the declared changes made (nested keys merged)."""
    config = copy.deepcopy(current)
    for key, value in unflatten({k: v[1] for k, v in diff.items()}).items():
        config[key] = (config.get(key) or {}) | value if isinstance(value, dict) else value
    return config


async def apply_stream(nc: Any, stream: Planned, check_mode: bool, outcome: Outcome, timeout: float) -> None:
    label = f"stream {stream.name}"
    if stream.current is None:
        if not check_mode:
            await request(nc, label, f"{JS}.STREAM.CREATE.{stream.name}", unflatten(stream.desired), timeout)
            outcome.applied.append(f"created {stream.name}")
        outcome.created.append(stream.name)
        outcome.after[stream.name] = unflatten(stream.desired)
    elif stream.diff:
        if not check_mode:
            config = merged(stream.current, stream.diff)
            await request(nc, label, f"{JS}.STREAM.UPDATE.{stream.name}", config, timeout)
            outcome.applied.append(f"updated {stream.name}")
        outcome.record(stream.name, stream.diff)
    for consumer in stream.consumers:
        await apply_consumer(nc, consumer, check_mode, outcome, timeout)


async def apply_consumer(nc: Any, consumer: Consumer, check_mode: bool, outcome: Outcome, timeout: float) -> None:
    label = f"stream {consumer.stream}: consumer {consumer.name}"
    subject = f"{JS}.CONSUMER.CREATE.{consumer.stream}.{consumer.name}"
    if consumer.current is None:
        if not check_mode:
            body = {"stream_name": consumer.stream, "config": consumer.desired, "action": "create"}
            await request(nc, label, subject, body, timeout)
            outcome.applied.append(f"created {consumer.label}")
        outcome.created.append(consumer.label)
        outcome.after[consumer.label] = consumer.desired
    elif consumer.diff:
        if not check_mode:
            body = {"stream_name": consumer.stream, "config": consumer.current | consumer.desired, "action": "update"}
            await request(nc, label, subject, body, timeout)
            outcome.applied.append(f"updated {consumer.label}")
        outcome.record(consumer.label, consumer.diff)


async def run(params: dict[str, Any], check_mode: bool, outcome: Outcome) -> dict[str, Any]:
    timeout = params["timeout"]
    nc = await connect(params, timeout)
    try:
        # Nothing is asked of the server before every declaration reads well.
        declared = read_declarations(params["streams"])
        try:
            planned, cannot, harmful = await plan(nc, declared, params["allow_destructive"], timeout)
        except Refused as error:
            raise Refused(f"{error}; nothing applied") from error
        refusals = []
        if cannot:
            refusals.append("Refusing changes the server cannot make: " + " | ".join(cannot))
        if harmful:
            refusals.append("Refusing destructive changes (allow_destructive=true to apply): " + " | ".join(harmful))
        if refusals:
            raise Refused(". ".join(refusals) + ". Nothing applied")
        for stream in planned:
            try:
                await apply_stream(nc, stream, check_mode, outcome, timeout)
            except Refused as error:
                rest = [s.name for s in planned[planned.index(stream) + 1 :]]
                raise Refused(f"{error}; {outcome.so_far()}; not applied: {', '.join(rest) or 'none'}") from error
        return {
            "changed": bool(outcome.created or outcome.updated),
            "created": outcome.created,
            "updated": outcome.updated,
            "diff": {"before": outcome.before, "after": outcome.after},
        }
    finally:
        await nc.close()


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **CONNECTION_ARGUMENT_SPEC,
            # raw, so that a declaration that is no mapping gets this module's message naming it.
            "streams": {"type": "list", "elements": "raw", "required": True},
            "allow_destructive": {"type": "bool", "default": False},
            "timeout": {"type": "float", "default": 5.0},
        },
        supports_check_mode=True,
    )
    if not HAS_NATS:
        module.fail_json(msg="jetstream_streams needs nats-py on the controller (pip install nats-py)")
    if module.params["timeout"] <= 0:
        module.fail_json(msg="timeout must be more than 0")
    outcome = Outcome()
    try:
        result = asyncio.run(asyncio.wait_for(run(module.params, module.check_mode, outcome), RUN_TIMEOUT))
    except (Refused, DeclarationError, ConnectError) as error:
        module.fail_json(msg=str(error), created=outcome.created, updated=outcome.updated)
    except TimeoutError:
        module.fail_json(
            msg=f"no answer from the cluster within {RUN_TIMEOUT:g} s; {outcome.so_far()}",
            created=outcome.created,
            updated=outcome.updated,
        )
    except (nats.errors.Error, OSError) as error:
        module.fail_json(msg=f"NATS: {type(error).__name__}: {error}; {outcome.so_far()}")
    module.exit_json(**result)


if __name__ == "__main__":
    main()
