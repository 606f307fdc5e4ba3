#!/usr/bin/python
"""Ansible module: find stale (leaked) JetStream consumers and optionally delete them."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: jetstream_consumers
short_description: Find and optionally delete stale JetStream consumers, from the controller
description:
  - Connects to the cluster with nats-py, lists every consumer of the selected streams (paging
    through the consumer list API, so streams with more than 256 consumers are covered) and gives
    each a verdict with a reason.
  - A consumer is stale only if all of these hold - idle longer than I(stale_after), where idle is
    the time since the latest of its creation, last delivery and last acknowledgement, measured on
    the server's clock; no messages pending; none awaiting an ack; no waiting pull requests; not
    bound to a push subscriber; and a name matching I(name_pattern) when that is set.
  - Deletes nothing unless I(delete) is set. Just before deleting, each consumer's info is fetched
    again and classified again; one that is no longer stale is kept and reported in
    C(kept_on_recheck). Deletions run at most 16 at a time.
  - Check mode deletes nothing and changes no stream; it reports what would be deleted or set,
    with changed=true when there is something.
  - A pull consumer whose client polls a stream that stays empty looks idle between its pulls
    (nothing is delivered, so nothing advances); choose I(stale_after) well above the longest
    quiet period of such streams.
extends_documentation_fragment:
  - jetstream_connection
options:
  streams:
    description: Streams to examine; empty means every stream in the account.
    type: list
    elements: str
    default: []
  stale_after:
    description: Idle time after which a consumer with nothing outstanding is stale (90s, 30m, 1h, 2d).
    type: str
    default: 1h
  name_pattern:
    description:
      - Shell-style glob (case-sensitive) on the consumer name; only matching consumers can be
        stale. Others are reported as kept.
    type: str
  delete:
    description: Delete the stale consumers. Without it the module only reports.
    type: bool
    default: false
  stream_inactive_threshold:
    description:
      - For prevention, set this stream-level default C(consumer_limits.inactive_threshold) on the
        selected streams that have none, so the server removes consumers that go idle for that
        long in future. An existing value is never overwritten.
      - The server applies it only to consumers created after it is set, durable ones included; a
        durable consumer whose client is away longer than this loses its position. The server
        then refuses to create a consumer that asks for a longer inactive_threshold (10153), and
        refuses the setting itself while an existing consumer asks for a longer one (10069, the
        module fails naming the stream).
    type: str
  timeout:
    description: Seconds for connecting and for each API call.
    type: float
    default: 5.0
requirements:
  - nats-py on the controller
author: cim-nats-infra
"""

EXAMPLES = r"""
- name: Consumers | report stale consumers
  jetstream_consumers:
    servers: "{{ jetstream_streams_servers }}"
    user: "{{ jetstream_streams_user }}"
    password: "{{ jetstream_streams_password }}"
    tls_ca_file: "{{ jetstream_streams_tls_ca_file }}"
    streams: [INFRASTRUCTURE_EVENTS]
    stale_after: 2h
  delegate_to: localhost
  run_once: true
  register: __stale

- name: Consumers | show them
  ansible.builtin.debug:
    msg: "{{ __stale.table }}"

- name: Consumers | delete leaked ephemeral-style consumers and stop new leaks
  jetstream_consumers:
    servers: "{{ jetstream_streams_servers }}"
    user: "{{ jetstream_streams_user }}"
    password: "{{ jetstream_streams_password }}"
    tls_ca_file: "{{ jetstream_streams_tls_ca_file }}"
    stale_after: 2h
    name_pattern: "tmp-*"
    delete: true
    stream_inactive_threshold: 1h
  delegate_to: localhost
  run_once: true
"""

RETURN = r"""
consumers:
  description:
    - Every consumer examined; keys stream, name, durable, idle_seconds, num_pending,
      num_ack_pending, num_waiting, push_bound, stale, reason.
    - For a consumer checked again before deletion this is the second look.
  type: list
  elements: dict
  returned: always
stale:
  description: STREAM/NAME of the consumers the scan found stale.
  type: list
  elements: str
  returned: always
deleted:
  description: STREAM/NAME of the consumers deleted (in check mode, that would be deleted).
  type: list
  elements: str
  returned: always
kept_on_recheck:
  description: STREAM/NAME of stale consumers that were no longer stale just before deletion.
  type: list
  elements: str
  returned: always
thresholds_set:
  description: Streams given a consumer_limits.inactive_threshold (in check mode, that would be).
  type: list
  elements: str
  returned: always
table:
  description: Fixed-width lines listing the stale consumers, then a totals line.
  type: list
  elements: str
  returned: always
"""

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.jetstream_api import (
    CONNECTION_ARGUMENT_SPEC,
    STREAM_NOT_FOUND,
    ApiError,
    ConnectError,
    api,
    connect,
    paged,
)
from ansible.module_utils.jetstream_consumer_staleness import (
    Consumer,
    Rules,
    Verdict,
    classify,
    human_duration,
    table,
)
from ansible.module_utils.jetstream_stream_spec import parse_duration

try:
    import nats

    HAS_NATS = True
except ImportError:  # reported by fail_json below
    HAS_NATS = False

DELETE_CONCURRENCY = 16
CONSUMER_NOT_FOUND = 10014
LIMITS_VIOLATE_CONSUMERS = 10069
# Subject tokens: a stream name with these would address another API subject.
_BAD_STREAM_NAME = re.compile(r"[\s.*>/\\]")


class Problem(Exception):
    """Bad input or an unusable cluster; the message says which."""


def unknown(stream: str, name: str, why: str) -> Verdict:
    """A consumer the server listed by name only: never stale, since nothing is known of it."""
    nothing = Consumer(stream, name, False, None, None, None, 0, 0, 0, False)
    return Verdict(nothing, False, f"no info from the server ({why})", 0)


@dataclass
class Cleanup:
    """One run: the connection, the rules, and what was found and done."""

    nc: Any
    rules: Rules
    check_mode: bool
    timeout: float
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    kept_on_recheck: list[str] = field(default_factory=list)
    thresholds_set: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def api(self, subject: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        answer: dict[str, Any] = await api(self.nc, subject, payload, self.timeout)
        return answer

    async def stream_names(self, requested: list[str]) -> list[str]:
        if requested:
            return list(dict.fromkeys(requested))
        names, _ = await paged(self.nc, "$JS.API.STREAM.NAMES", "streams", self.timeout)
        return sorted(set(names))

    async def set_threshold(self, stream: str, threshold: int) -> None:
        config = (await self.api(f"$JS.API.STREAM.INFO.{stream}"))["config"]
        limits = dict(config.get("consumer_limits") or {})
        if limits.get("inactive_threshold"):
            return
        self.thresholds_set.append(stream)
        if not self.check_mode:
            # The server's own config back with one field added: no field nats-py does not know is lost.
            config["consumer_limits"] = limits | {"inactive_threshold": threshold}
            try:
                await self.api(f"$JS.API.STREAM.UPDATE.{stream}", config)
            except ApiError as error:
                if error.err_code != LIMITS_VIOLATE_CONSUMERS:
                    raise
                done = self.thresholds_set[:-1]
                raise Problem(
                    f"stream {stream}: the server refuses consumer_limits.inactive_threshold "
                    f"{human_duration(threshold)} because existing consumers ask for a longer one ({error}); "
                    f"choose a longer stream_inactive_threshold (already set on: {done or 'none'})"
                ) from error

    def judge(self, info: dict[str, Any]) -> Verdict:
        verdict = classify(Consumer.from_api(info), self.rules, time.time_ns())
        self.verdicts[verdict.consumer.label] = verdict
        return verdict

    async def scan(self, stream: str) -> None:
        infos, missing = await paged(self.nc, f"$JS.API.CONSUMER.LIST.{stream}", "consumers", self.timeout)
        for info in infos:
            self.judge(info)
        for name in missing:
            try:
                self.judge(await self.api(f"$JS.API.CONSUMER.INFO.{stream}.{name}"))
            except ApiError as error:
                self.verdicts[f"{stream}/{name}"] = unknown(stream, name, str(error))

    async def recheck_and_delete(self, label: str, gate: asyncio.Semaphore) -> None:
        first = self.verdicts[label]
        c = first.consumer
        async with gate:
            try:
                if not self.judge(await self.api(f"$JS.API.CONSUMER.INFO.{c.stream}.{c.name}")).stale:
                    self.kept_on_recheck.append(label)
                    return
                if not self.check_mode:
                    await self.api(f"$JS.API.CONSUMER.DELETE.{c.stream}.{c.name}")
                self.deleted.append(label)
            except ApiError as error:
                if error.err_code == CONSUMER_NOT_FOUND:
                    # Gone meanwhile (an ephemeral's own threshold, another operator): nothing to do.
                    self.verdicts[label] = Verdict(c, False, "gone before deletion", first.idle)
                else:
                    self.errors.append(f"{label}: {error}")

    async def delete_stale(self) -> None:
        gate = asyncio.Semaphore(DELETE_CONCURRENCY)
        await asyncio.gather(*(self.recheck_and_delete(label, gate) for label in self.stale))


def validate(params: dict[str, Any]) -> tuple[int, int | None]:
    """Input problems, found before connecting; returns stale_after and the threshold in ns."""
    bad = [s for s in params["streams"] if not s or _BAD_STREAM_NAME.search(s)]
    if bad:
        raise Problem(f"invalid stream names {bad}: no spaces, '.', '*', '>' or slashes")
    if params["timeout"] <= 0:
        raise Problem("timeout must be more than 0")
    try:
        stale_after = parse_duration(params["stale_after"])
    except ValueError as error:
        raise Problem(f"stale_after: {error} (use e.g. 90s, 30m, 1h, 2d)") from error
    if stale_after <= 0:
        raise Problem("stale_after must be more than 0: every consumer with nothing outstanding would be stale")
    threshold = None
    if params["stream_inactive_threshold"] is not None:
        try:
            threshold = parse_duration(params["stream_inactive_threshold"])
        except ValueError as error:
            raise Problem(f"stream_inactive_threshold: {error} (use e.g. 30m, 1h, 2d)") from error
        if threshold <= 0:
            raise Problem("stream_inactive_threshold must be more than 0")
    return stale_after, threshold


async def run(params: dict[str, Any], check_mode: bool) -> dict[str, Any]:
    stale_after, threshold = validate(params)
    nc = await connect(params, params["timeout"])
    job = Cleanup(nc, Rules(stale_after, params["name_pattern"]), check_mode, params["timeout"])
    try:
        explicit = bool(params["streams"])
        streams = await job.stream_names(params["streams"])
        for stream in streams:
            try:
                if threshold is not None:
                    await job.set_threshold(stream, threshold)
                await job.scan(stream)
            except ApiError as error:
                if error.err_code != STREAM_NOT_FOUND:
                    raise
                if explicit:
                    raise Problem(f"stream not found: {stream}") from error
                # Listed a moment ago, deleted since: nothing to clean there.
        job.stale = sorted(label for label, v in job.verdicts.items() if v.stale)
        if params["delete"]:
            await job.delete_stale()
    finally:
        await nc.close()
    job.deleted.sort()
    job.kept_on_recheck.sort()
    verdicts = sorted(job.verdicts.values(), key=lambda v: (v.consumer.stream, v.consumer.name))
    lines = table(verdicts, job.deleted, job.kept_on_recheck, len(streams))
    result: dict[str, Any] = {
        "changed": bool(job.deleted or job.thresholds_set),
        "consumers": [v.as_dict() for v in verdicts],
        "stale": job.stale,
        "deleted": job.deleted,
        "kept_on_recheck": job.kept_on_recheck,
        "thresholds_set": job.thresholds_set,
        "table": lines,
        "msg": lines[-1],
    }
    if job.errors:
        result["failed"] = True
        result["msg"] = f"{len(job.errors)} deletions failed: " + "; ".join(sorted(job.errors))
    return result


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **CONNECTION_ARGUMENT_SPEC,
            "streams": {"type": "list", "elements": "str", "default": []},
            "stale_after": {"type": "str", "default": "1h"},
            "name_pattern": {"type": "str"},
            "delete": {"type": "bool", "default": False},
            "stream_inactive_threshold": {"type": "str"},
            "timeout": {"type": "float", "default": 5.0},
        },
        supports_check_mode=True,
    )
    if not HAS_NATS:
        module.fail_json(msg="jetstream_consumers needs nats-py on the controller (pip install nats-py)")
    try:
        result = asyncio.run(run(module.params, module.check_mode))
    except (Problem, ConnectError) as error:
        module.fail_json(msg=str(error))
    except ApiError as error:
        module.fail_json(msg=f"JetStream API: {error}")
    except (nats.errors.Error, OSError, TimeoutError) as error:
        module.fail_json(msg=f"NATS: {type(error).__name__}: {error}")
    if result.pop("failed", False):
        module.fail_json(**result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
