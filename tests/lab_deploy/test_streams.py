"""Streams as code on the lab: INFRASTRUCTURE_EVENTS created at R3 by site.yml, a raised limit
applied in place with data kept, a destructive change refused, re-runs changing nothing."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any

import pytest

from tests.helpers import LAB_INVENTORY, delete_stream, run_playbook
from verify.client import connect_tls_or_nothing
from verify.inventory import Cluster
from verify.streams import stream_spec

pytestmark = pytest.mark.lab
STREAM = "INFRASTRUCTURE_EVENTS"


def declared(cluster: Cluster) -> dict[str, Any]:
    (stream,) = [s for s in cluster.nodes[0]["jetstream_streams_declared"] if s["name"] == STREAM]
    return dict(stream)


def info(cluster: Cluster) -> Any:
    async def read() -> Any:
        nc = await connect_tls_or_nothing(cluster.client_urls, connect_timeout=3, **cluster.login())
        try:
            return await nc.jetstream(timeout=5).stream_info(STREAM)
        finally:
            await nc.close()

    return asyncio.run(read())


def publish_events(cluster: Cluster, count: int) -> None:
    async def send() -> None:
        nc = await connect_tls_or_nothing(cluster.client_urls, connect_timeout=3, **cluster.login())
        js = nc.jetstream(timeout=5)
        aggregate = uuid.uuid4()
        for n in range(count):
            await js.publish(f"infrastructure.labtest.{aggregate}.ticked", json.dumps({"n": n}).encode())
        await nc.close()

    asyncio.run(send())


def streams_playbook(*args: str) -> tuple[int, str]:
    result = run_playbook("streams.yml", LAB_INVENTORY, *args)
    return result.returncode, result.stdout + result.stderr


def with_streams(streams: list[dict[str, Any]]) -> list[str]:
    return ["-e", json.dumps({"jetstream_streams_declared": streams})]


def test_declared_stream_exists_at_three_replicas_on_distinct_nodes(deployed_lab: Cluster) -> None:
    current = info(deployed_lab)
    spec = stream_spec()
    assert spec.changes(current.config.as_dict(), spec.desired_config(declared(deployed_lab))) == {}
    placed = [current.cluster.leader] + [r.name for r in current.cluster.replicas]
    assert sorted(placed) == ["nats-1", "nats-2", "nats-3"]
    assert all(r.current for r in current.cluster.replicas)


def test_raised_limit_is_applied_in_place_with_data_kept(deployed_lab: Cluster) -> None:
    publish_events(deployed_lab, 20)
    before = info(deployed_lab)
    raised = declared(deployed_lab) | {"max_bytes": "12GB"}
    code, output = streams_playbook(*with_streams([raised]), "--check", "--diff")
    assert code == 0 and "changed: [nats-1 -> localhost]" in output, output[-3000:]
    assert info(deployed_lab).config.max_bytes == before.config.max_bytes, "check mode changed the stream"
    code, output = streams_playbook(*with_streams([raised]))
    assert code == 0 and "changed: [nats-1 -> localhost]" in output, output[-3000:]
    after = info(deployed_lab)
    assert after.config.max_bytes == 12 << 30
    assert after.state.messages == before.state.messages and after.state.first_seq == before.state.first_seq
    code, output = streams_playbook(*with_streams([raised]))
    assert code == 0 and "changed=0" in output and "changed: [" not in output, output[-3000:]


def test_destructive_change_is_refused_with_its_reason(deployed_lab: Cluster) -> None:
    before = info(deployed_lab)
    fewer = declared(deployed_lab) | {"max_bytes": "12GB", "replicas": 1}
    code, output = streams_playbook(*with_streams([fewer]))
    assert code != 0
    assert f"stream {STREAM}: replicas 3 -> 1 (fewer copies)" in output, output[-3000:]
    assert "allow_destructive=true" in output
    after = info(deployed_lab)
    assert after.config.num_replicas == 3 and after.state.messages == before.state.messages


def test_lowering_back_needs_the_explicit_allowance_then_site_reruns_clean(deployed_lab: Cluster) -> None:
    code, output = streams_playbook()
    assert code != 0 and "max_bytes lowered" in output, output[-3000:]
    code, output = streams_playbook("-e", "jetstream_streams_allow_destructive=true")
    assert code == 0, output[-3000:]
    assert info(deployed_lab).config.max_bytes == 10 << 30
    result = run_playbook("site.yml", LAB_INVENTORY)
    assert result.returncode == 0, result.stdout[-3000:]
    assert all(int(n) == 0 for n in re.findall(r"changed=(\d+)", result.stdout)), result.stdout[-2000:]


# INFRASTRUCTURE_EVENTS as production runs it before this change (the declaration it came from:
# max_age 30d, max_bytes 10GB, consumer_inactive_threshold 1h; discard old by the server's default).
NO_PLACEMENT = 10005
TODAYS_STREAM = {
    "name": STREAM,
    "description": "CIM infrastructure event store",
    "subjects": ["infrastructure.>"],
    "storage": "file",
    "num_replicas": 3,
    "retention": "limits",
    "discard": "old",
    "max_age": 30 * 86400 * 10**9,
    "max_bytes": 10 << 30,
    "allow_direct": True,
    "allow_atomic": True,
    "duplicate_window": 120 * 10**9,
    "consumer_limits": {"inactive_threshold": 3600 * 10**9},
}


def test_todays_stream_migrates_to_keeping_every_event(deployed_lab: Cluster) -> None:
    """From today's declaration with events in it: streams.yml turns it into a stream that keeps
    every event (no age limit, discard new, delete and purge denied, no consumer default), in place:
    every event is still there with its sequence, subject and payload."""
    delete_stream(deployed_lab, STREAM)

    async def create_todays() -> list[tuple[int, str, bytes]]:
        nc = await connect_tls_or_nothing(deployed_lab.client_urls, connect_timeout=3, **deployed_lab.login())
        js = nc.jetstream(timeout=10)
        # A stream just deleted frees its storage reservation on the peers a moment later (10005).
        for _ in range(40):
            answer = await nc.request(f"$JS.API.STREAM.CREATE.{STREAM}", json.dumps(TODAYS_STREAM).encode(), 10)
            reply = json.loads(answer.data)
            if (reply.get("error") or {}).get("err_code") != NO_PLACEMENT:
                break
            await asyncio.sleep(0.5)
        assert "error" not in reply, reply
        events = []
        for n in range(60):
            subject = f"infrastructure.compute.{uuid.UUID(int=n % 6)}.created"
            body = json.dumps({"event_id": str(uuid.uuid4()), "sequence": n}).encode()
            events.append(((await js.publish(subject, body)).seq, subject, body))
        await nc.close()
        return events

    async def stored(seqs: list[int]) -> list[tuple[int, str, bytes]]:
        nc = await connect_tls_or_nothing(deployed_lab.client_urls, connect_timeout=3, **deployed_lab.login())
        js = nc.jetstream(timeout=10)
        found = []
        for seq in seqs:
            msg = await js.get_msg(STREAM, seq)
            found.append((msg.seq or 0, msg.subject or "", msg.data or b""))
        await nc.close()
        return found

    events = asyncio.run(create_todays())
    code, output = streams_playbook()
    assert code == 0 and "changed: [nats-1 -> localhost]" in output, output[-3000:]
    assert asyncio.run(stored([seq for seq, _, _ in events])) == events
    config = info(deployed_lab).config
    assert config.max_age == 0 and getattr(config.discard, "value", config.discard) == "new"
    assert config.deny_delete and config.deny_purge and config.num_replicas == 3
    assert not (config.consumer_limits and config.consumer_limits.inactive_threshold)
    code, output = streams_playbook()
    assert code == 0 and "changed=0" in output and "changed: [" not in output, output[-3000:]


def stream_configs(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """Every stream on the cluster with its config, as the servers hold them."""

    async def read() -> dict[str, dict[str, Any]]:
        nc = await connect_tls_or_nothing(cluster.client_urls, connect_timeout=3, **cluster.login())
        try:
            js = nc.jetstream(timeout=10)
            return {s.config.name or "": s.config.as_dict() for s in await js.streams_info()}
        finally:
            await nc.close()

    return asyncio.run(read())


def test_a_bad_declaration_leaves_every_stream_as_it_was(deployed_lab: Cluster) -> None:
    """A bad stream among good ones, refused by the preflight (replicas above the cluster) and by
    the server's state (subjects an undeclared stream already takes): nothing is created or
    changed, and the refusal names the stream."""
    other = "LABTEST_UNDECLARED"

    async def create_undeclared() -> None:
        nc = await connect_tls_or_nothing(deployed_lab.client_urls, connect_timeout=3, **deployed_lab.login())
        try:
            await nc.jetstream(timeout=10).add_stream(name=other, subjects=["labother.>"], num_replicas=1)
        finally:
            await nc.close()

    asyncio.run(create_undeclared())
    try:
        before = stream_configs(deployed_lab)
        good = {"name": "LABTEST_ALPHA", "subjects": ["alpha.>"], "replicas": 3, "max_bytes": "64MB"}
        raised = declared(deployed_lab) | {"max_bytes": "11GB"}
        for bad, reason in (
            (good | {"name": "LABTEST_BETA", "subjects": ["beta.>"], "replicas": 5}, "LABTEST_BETA"),
            (good | {"name": "LABTEST_BETA", "subjects": ["labother.x"]}, "LABTEST_BETA"),
        ):
            code, output = streams_playbook(*with_streams([raised, good, bad]))
            assert code != 0 and reason in output, output[-3000:]
            assert stream_configs(deployed_lab) == before, "a refused declaration changed the streams"
    finally:
        delete_stream(deployed_lab, other)
