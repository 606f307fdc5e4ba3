#!/usr/bin/python
"""Ansible module: find stale (leaked) JetStream consumers and optionally delete them."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: jetstream_consumers
short_description: Find and optionally delete stale JetStream consumers, from the controller
description:
  - Connects to the cluster with nats-py and examines every consumer of the selected streams. The
    complete set of names comes from the consumer names API (the meta layer's assignments, paged
    1024 at a time); the details from the consumer list API (256 a page), which in a cluster leaves
    out consumers whose servers did not answer the meta leader in time; every name the list did
    not return is asked for on its own (consumer info, 16 at a time, asked twice when there is no
    answer). Each consumer gets a verdict with a reason.
  - A consumer that still cannot be seen is counted and named, never guessed at. The module then
    fails, after deleting the stale consumers it did see (when I(delete) is set), naming how many
    it could not see and the first few. A run that succeeds has judged every consumer.
  - A consumer is stale only if all of these hold - not named in I(protected); idle longer than
    I(stale_after), where idle is the time since the latest of its creation, last delivery and
    last acknowledgement, measured on the server's clock; no messages pending; none awaiting an
    ack; no waiting pull requests; not bound to a push subscriber; and a name matching
    I(name_pattern) when that is set.
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
    description:
      - Streams to examine; empty means every stream in the account. A named stream that does not
        exist fails the run before anything is examined or changed.
    type: list
    elements: str
    default: []
  stale_after:
    description:
      - Idle time after which a consumer with nothing outstanding is stale (1m, 90s, 1m30s, 30m,
        1h, 2d). At least 30s; less is refused (a client between two of its requests can look
        idle that long).
    type: str
    default: 1h
  protected:
    description:
      - Consumers never to delete, as STREAM/NAME (the durable consumers declared in the
        inventory). They are reported as kept, with the reason C(declared in the inventory), even
        when every other rule would make them stale.
    type: list
    elements: str
    default: []
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
    protected: [INFRASTRUCTURE_EVENTS/projector]
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
    - For a consumer checked again before deletion this is the second look; one that could not be
      seen has a reason starting C(not seen).
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
unseen:
  description: STREAM/NAME of the consumers listed by name whose info could not be read (the run fails).
  type: list
  elements: str
  returned: always
counts:
  description:
    - The run's figures - streams, names (consumers listed by name), seen, listed (of the seen,
      those the list API returned; the others were asked for one by one), unseen, gone (listed
      but gone before their info was read), stale, deleted (in check mode, that would be),
      kept_on_recheck, gone_before_deletion, failed (deletions), declared (consumers named in
      I(protected) that exist).
    - names = seen + unseen + gone.
  type: dict
  returned: always
thresholds_set:
  description: Streams given a consumer_limits.inactive_threshold (in check mode, that would be).
  type: list
  elements: str
  returned: always
table:
  description: Fixed-width lines listing the stale consumers, then a totals line with every figure of C(counts).
  type: list
  elements: str
  returned: always
"""

import asyncio
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.jetstream_api import (
    CONNECTION_ARGUMENT_SPEC,
    STREAM_NOT_FOUND,
    ApiError,
    ConnectError,
    NoAnswer,
    api,
    connect,
    paged,
)
from ansible.module_utils.jetstream_consumer_staleness import (
    NANOS,
    Consumer,
    Counts,
    Rules,
    Verdict,
    classify,
    human_duration,
    table,
    totals,
)
from ansible.module_utils.jetstream_stream_spec import parse_duration

try:
    import nats

    HAS_NATS = True
except ImportError:  # reported by fail_json below
    HAS_NATS = False

# Requests in flight at once: consumer info for the names the list left out, and recheck+delete.
INFO_CONCURRENCY = 16
DELETE_CONCURRENCY = 16
# A consumer info with no answer is asked once more before the consumer counts as not seen.
INFO_ATTEMPTS = 2
# Below this a client merely between two of its requests (a pull, a reconnect) can look idle.
MIN_STALE_AFTER = 30 * NANOS
# Times the names are read again from the start when consumers going meanwhile shift the pages.
NAMES_ATTEMPTS = 3
# How many unseen consumers the failure message names.
UNSEEN_SHOWN = 5
CONSUMER_NOT_FOUND = 10014
LIMITS_VIOLATE_CONSUMERS = 10069
# Subject tokens: a stream name with these would address another API subject.
_BAD_STREAM_NAME = re.compile(r"[\s.*>/\\]")
# STREAM/NAME: neither part can hold a slash (the server refuses path separators in both).
_PROTECTED = re.compile(r"[^\s.*>/\\]+/[^\s.*>/\\]+")


class Problem(Exception):
    """Bad input or an unusable cluster; the message says which."""


def not_seen(stream: str, name: str, why: str) -> Verdict:
    """A consumer known by name only: never stale, since nothing is known of it."""
    nothing = Consumer(stream, name, False, None, None, None, 0, 0, 0, False)
    return Verdict(nothing, False, f"not seen: no info from the server ({why})", 0)


@dataclass
class Cleanup:
    """One run: the connection, the rules, and what was found and done."""

    nc: Any
    rules: Rules
    check_mode: bool
    timeout: float
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    names: dict[str, int] = field(default_factory=dict)  # stream -> consumers listed by name
    listed: int = 0  # consumers judged from the list's pages (the others were asked for one by one)
    unseen: dict[str, str] = field(default_factory=dict)  # STREAM/NAME -> why its info is missing
    gone: list[str] = field(default_factory=list)  # listed by name, gone before its info was read
    stale: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    kept_on_recheck: list[str] = field(default_factory=list)
    gone_before_deletion: list[str] = field(default_factory=list)
    thresholds_set: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def api(self, subject: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        answer: dict[str, Any] = await api(self.nc, subject, payload, self.timeout)
        return answer

    async def stream_names(self, requested: list[str]) -> list[str]:
        """The streams to examine: every stream, or the requested ones once each is known to exist
        (before anything is changed on any of them)."""
        names, _ = await paged(self.nc, "$JS.API.STREAM.NAMES", "streams", self.timeout)
        if not requested:
            return sorted(set(names))
        missing = [s for s in dict.fromkeys(requested) if s not in set(names)]
        if missing:
            which = "stream" if len(missing) == 1 else "streams"
            raise Problem(f"{which} {', '.join(missing)}: not found, so nothing was examined or changed")
        return list(dict.fromkeys(requested))

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

    # The three raw reads, each one request (tests replace them to play an incomplete cluster).
    async def names_page(self, stream: str, offset: int) -> dict[str, Any]:
        return await self.api(f"$JS.API.CONSUMER.NAMES.{stream}", {"offset": offset})

    async def list_page(self, stream: str, offset: int) -> dict[str, Any]:
        return await self.api(f"$JS.API.CONSUMER.LIST.{stream}", {"offset": offset})

    async def info_once(self, stream: str, name: str) -> dict[str, Any]:
        return await self.api(f"$JS.API.CONSUMER.INFO.{stream}.{name}")

    async def consumer_names(self, stream: str) -> list[str]:
        """Every consumer name of the stream, sorted as the server sorts them. In a cluster the
        meta leader answers from its assignments, so the set is complete. Each page starts one
        name before the previous one ended; a page that does not reach back to it means
        consumers went meanwhile and shifted the rest (a name could have been skipped), so the
        reading starts again."""
        for _ in range(NAMES_ATTEMPTS):
            names: list[str] = []
            offset = 0
            while True:
                data = await self.names_page(stream, offset)
                page = sorted(data.get("consumers") or [])
                last = names[-1] if names else None
                if last is not None and (not page or page[0] > last):
                    break  # a gap: read again from the start
                names.extend(n for n in page if last is None or n > last)
                if len(page) < 2 or offset + len(page) >= int(data.get("total") or 0):
                    return names
                offset += len(page) - 1
        raise Problem(
            f"stream {stream}: the consumer names kept changing while they were read ({NAMES_ATTEMPTS} times); "
            "run it again"
        )

    async def list_details(self, stream: str) -> dict[str, dict[str, Any]]:
        """Consumer infos from the list pages, by name. A name the server reports `missing` (its
        server did not answer the meta leader in time) or `offline` is left out: its entry, if
        any, holds only the configuration, not the state. A page with no answer ends the list
        (the names it would have covered are asked for one by one)."""
        found: dict[str, dict[str, Any]] = {}
        offset = 0
        while True:
            try:
                data = await self.list_page(stream, offset)
            except NoAnswer:
                return found
            page = data.get("consumers") or []
            missing = set(data.get("missing") or []) | set(data.get("offline") or {})
            found.update((info["name"], info) for info in page if info.get("name") and info["name"] not in missing)
            # The server cuts its pages from the sorted assignments before it asks for them, so the
            # next page starts `limit` further on, however many answers this one had.
            step = int(data.get("limit") or 0) or len(page) + len(missing)
            offset += step
            if step <= 0 or offset >= int(data.get("total") or 0):
                return found

    async def info(self, stream: str, name: str) -> dict[str, Any] | None:
        """CONSUMER.INFO, asked again once if there is no answer; None when the consumer is gone."""
        for attempt in range(1, INFO_ATTEMPTS + 1):
            try:
                return await self.info_once(stream, name)
            except NoAnswer:
                if attempt == INFO_ATTEMPTS:
                    raise
            except ApiError as error:
                if error.err_code == CONSUMER_NOT_FOUND:
                    return None
                raise
        raise AssertionError("unreachable")

    def judge(self, info: dict[str, Any]) -> Verdict:
        verdict = classify(Consumer.from_api(info), self.rules, time.time_ns())
        self.verdicts[verdict.consumer.label] = verdict
        return verdict

    async def look_up(self, stream: str, name: str, gate: asyncio.Semaphore) -> None:
        label = f"{stream}/{name}"
        async with gate:
            try:
                info = await self.info(stream, name)
            except ApiError as error:
                self.unseen[label] = str(error)
                self.verdicts[label] = not_seen(stream, name, str(error))
                return
        if info is None:
            self.gone.append(label)
        else:
            self.judge(info)

    async def scan(self, stream: str) -> None:
        """Every consumer of the stream judged, or counted as not seen."""
        names = await self.consumer_names(stream)
        self.names[stream] = len(names)
        listed = await self.list_details(stream)
        rest = []
        for name in names:
            if name in listed:
                self.judge(listed[name])
                self.listed += 1
            else:
                rest.append(name)
        gate = asyncio.Semaphore(INFO_CONCURRENCY)
        await asyncio.gather(*(self.look_up(stream, name, gate) for name in rest))

    async def recheck_and_delete(self, label: str, gate: asyncio.Semaphore) -> None:
        first = self.verdicts[label]
        c = first.consumer
        async with gate:
            try:
                info = await self.info(c.stream, c.name)
                if info is not None:
                    if not self.judge(info).stale:
                        self.kept_on_recheck.append(label)
                        return
                    if not self.check_mode:
                        await self.api(f"$JS.API.CONSUMER.DELETE.{c.stream}.{c.name}")
                    self.deleted.append(label)
                    return
            except ApiError as error:
                if error.err_code != CONSUMER_NOT_FOUND:
                    self.errors.append(f"{label}: {error}")
                    return
            # Gone meanwhile (an ephemeral's own threshold, another operator): nothing to do.
            self.verdicts[label] = Verdict(c, False, "gone before deletion", first.idle)
            self.gone_before_deletion.append(label)

    async def delete_stale(self) -> None:
        gate = asyncio.Semaphore(DELETE_CONCURRENCY)
        await asyncio.gather(*(self.recheck_and_delete(label, gate) for label in self.stale))

    def counts(self, streams: int) -> Counts:
        return Counts(
            streams=streams,
            names=sum(self.names.values()),
            seen=len(self.verdicts) - len(self.unseen),
            listed=self.listed,
            unseen=len(self.unseen),
            gone=len(self.gone),
            stale=len(self.stale),
            deleted=len(self.deleted),
            kept_on_recheck=len(self.kept_on_recheck),
            gone_before_deletion=len(self.gone_before_deletion),
            failed=len(self.errors),
            declared=len(self.rules.protected & self.verdicts.keys()),
        )

    def actions(self) -> dict[str, str]:
        """What was done to each stale consumer, for the table."""
        done = {label: "would delete" if self.check_mode else "deleted" for label in self.deleted}
        done |= dict.fromkeys(self.kept_on_recheck, "kept on recheck")
        done |= dict.fromkeys(self.gone_before_deletion, "gone")
        done |= {error.split(": ", 1)[0]: "failed" for error in self.errors}
        return done


def validate(params: dict[str, Any]) -> tuple[int, int | None, frozenset[str]]:
    """Input problems, found before connecting; returns stale_after and the threshold in ns, and
    the protected consumers."""
    bad = [s for s in params["streams"] if not s or _BAD_STREAM_NAME.search(s)]
    if bad:
        raise Problem(f"invalid stream names {bad}: no spaces, '.', '*', '>' or slashes")
    if params["timeout"] <= 0:
        raise Problem("timeout must be more than 0")
    try:
        stale_after = parse_duration(params["stale_after"])
    except ValueError as error:
        raise Problem(f"stale_after: {error} (use e.g. 1m, 30m, 1h, 2d)") from error
    if stale_after < MIN_STALE_AFTER:
        raise Problem(
            f"stale_after must be at least {human_duration(MIN_STALE_AFTER)}, not {params['stale_after']}: "
            "a consumer whose client is only between two requests can look idle that long (use e.g. 1m, 30m, 1h)"
        )
    threshold = None
    if params["stream_inactive_threshold"] is not None:
        try:
            threshold = parse_duration(params["stream_inactive_threshold"])
        except ValueError as error:
            raise Problem(f"stream_inactive_threshold: {error} (use e.g. 30m, 1h, 2d)") from error
        if threshold <= 0:
            raise Problem("stream_inactive_threshold must be more than 0")
    protected = [str(p) for p in params["protected"]]
    bad = [p for p in protected if not _PROTECTED.fullmatch(p)]
    if bad:
        raise Problem(f"protected: {bad} are not STREAM/NAME (each name without spaces, '.', '*', '>' or slashes)")
    return stale_after, threshold, frozenset(protected)


def failure(job: Cleanup, line: str) -> str | None:
    """Why the run failed, with the figures; None when every consumer was judged and every
    deletion done."""
    reasons = []
    if job.unseen:
        labels = sorted(job.unseen)
        shown = ", ".join(labels[:UNSEEN_SHOWN]) + (
            f" and {len(labels) - UNSEEN_SHOWN} more" if len(labels) > UNSEEN_SHOWN else ""
        )
        reasons.append(
            f"{len(labels)} of {sum(job.names.values())} consumers could not be seen, so they were not judged: "
            f"{shown} ({job.unseen[labels[0]]}); run it again once every server answers"
        )
    if job.errors:
        reasons.append(f"{len(job.errors)} deletions failed: " + "; ".join(sorted(job.errors)))
    if not reasons:
        return None
    return ". ".join(reasons) + f". {line}"


async def run(params: dict[str, Any], check_mode: bool) -> dict[str, Any]:
    stale_after, threshold, protected = validate(params)
    nc = await connect(params, params["timeout"])
    job = Cleanup(nc, Rules(stale_after, params["name_pattern"], protected), check_mode, params["timeout"])
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
                    raise Problem(f"stream {stream}: deleted while it was examined") from error
                # Listed a moment ago, deleted since: nothing to clean there.
        job.stale = sorted(label for label, v in job.verdicts.items() if v.stale)
        if params["delete"]:
            await job.delete_stale()
    finally:
        await nc.close()
    for found in (job.deleted, job.kept_on_recheck, job.gone, job.gone_before_deletion):
        found.sort()
    verdicts = sorted(job.verdicts.values(), key=lambda v: (v.consumer.stream, v.consumer.name))
    counts = job.counts(len(streams))
    line = totals(counts, ("check" if check_mode else "delete") if params["delete"] else "report")
    result: dict[str, Any] = {
        "changed": bool(job.deleted or job.thresholds_set),
        "consumers": [v.as_dict() for v in verdicts],
        "stale": job.stale,
        "deleted": job.deleted,
        "kept_on_recheck": job.kept_on_recheck,
        "unseen": sorted(job.unseen),
        "counts": asdict(counts),
        "thresholds_set": job.thresholds_set,
        "table": [*table(verdicts, job.actions()), line],
        "msg": line,
    }
    why = failure(job, line)
    if why:
        result["failed"] = True
        result["msg"] = why
    return result


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **CONNECTION_ARGUMENT_SPEC,
            "streams": {"type": "list", "elements": "str", "default": []},
            "stale_after": {"type": "str", "default": "1h"},
            "protected": {"type": "list", "elements": "str", "default": []},
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
