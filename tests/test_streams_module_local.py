"""The jetstream_streams module against a real single-node nats-server on loopback: create,
in-place update with data kept, refusal of destructive changes, check mode, idempotence, the
keep-every-event defaults, and the migration of a stream that deleted events by age and size."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml

from tests.helpers import REPO, ansible_env, run_playbook
from tests.local_nats import local_jetstream

STREAM = {
    "name": "LOCAL_EVENTS",
    "subjects": ["local.>"],
    "storage": "file",
    "replicas": 1,
    "retention": "limits",
    "max_bytes": "256MB",
    "allow_direct": True,
    "allow_atomic": True,
    "duplicate_window": "2m",
    "consumers": [{"name": "projector", "filter_subject": "local.>", "ack_policy": "explicit"}],
}


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with local_jetstream(tmp_path_factory.mktemp("nats")) as url:
        yield url


def apply(
    tmp_path: Path, server_url: str, streams: list[dict[str, Any]], *args: str, allow_destructive: bool = False
) -> tuple[int, dict[str, Any], str]:
    playbook = tmp_path / "streams.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Streams on a local server",
                    "hosts": "localhost",
                    "connection": "local",
                    "gather_facts": False,
                    "vars": {"ansible_python_interpreter": "{{ ansible_playbook_python }}"},
                    "tasks": [
                        {
                            "name": "Apply",
                            "jetstream_streams": {
                                "servers": [server_url],
                                "streams": streams,
                                "allow_destructive": allow_destructive,
                            },
                            "register": "result",
                        },
                        {"name": "Show", "ansible.builtin.debug": {"var": "result"}},
                    ],
                }
            ]
        )
    )
    result = run_playbook(
        str(playbook),
        "localhost,",
        *args,
        json_output=True,
        env=ansible_env(ANSIBLE_LIBRARY=str(REPO / "plugins/modules")),
    )
    try:
        plays = json.loads(result.stdout)["plays"]
        outcome = plays[0]["tasks"][0]["hosts"]["localhost"]
    except (ValueError, KeyError, IndexError):
        outcome = {}
    return result.returncode, outcome, result.stdout + result.stderr


def stream_info(server_url: str) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        nc = await nats.connect(server_url)
        info = await nc.jetstream().stream_info("LOCAL_EVENTS")
        await nc.close()
        return {"config": info.config.as_dict(), "messages": info.state.messages}

    return asyncio.run(read())


def publish(server_url: str, count: int) -> None:
    async def send() -> None:
        nc = await nats.connect(server_url)
        js = nc.jetstream()
        for n in range(count):
            await js.publish("local.x", str(n).encode())
        await nc.close()

    asyncio.run(send())


def test_streams_lifecycle(tmp_path: Path, server_url: str) -> None:
    # Check mode on an empty server: reports the creation, creates nothing.
    code, outcome, output = apply(tmp_path, server_url, [STREAM], "--check")
    assert code == 0, output[-3000:]
    assert outcome["changed"] and outcome["created"] == ["LOCAL_EVENTS", "LOCAL_EVENTS/projector"]
    with pytest.raises(nats.js.errors.NotFoundError):
        stream_info(server_url)

    code, outcome, output = apply(tmp_path, server_url, [STREAM])
    assert code == 0 and outcome["changed"], output[-3000:]
    info = stream_info(server_url)["config"]
    assert info["num_replicas"] == 1 and info["max_age"] == 0
    assert info["allow_atomic"] and info["allow_direct"]
    # Left out of the declaration: the keep-every-event defaults.
    assert info["discard"] == "new" and info["deny_delete"] and info["deny_purge"]
    assert not (info.get("consumer_limits") or {}).get("inactive_threshold")

    code, outcome, output = apply(tmp_path, server_url, [STREAM])
    assert code == 0 and not outcome["changed"], outcome

    publish(server_url, 5)
    bigger = STREAM | {"max_bytes": "512MB", "subjects": ["local.>", "more.>"]}
    code, outcome, output = apply(tmp_path, server_url, [bigger], "--check", "--diff")
    assert code == 0 and outcome["updated"] == ["LOCAL_EVENTS"], outcome
    assert stream_info(server_url)["config"]["max_bytes"] == 256 << 20, "check mode changed the stream"
    code, outcome, output = apply(tmp_path, server_url, [bigger])
    assert code == 0 and outcome["updated"] == ["LOCAL_EVENTS"], output[-3000:]
    after = stream_info(server_url)
    assert after["config"]["max_bytes"] == 512 << 20 and after["messages"] == 5, "data not kept on update"

    harmful_changes: list[tuple[dict[str, Any], str]] = [
        ({"storage": "memory"}, "NATS cannot change it in place"),
        ({"subjects": ["more.>"]}, "subjects removed ['local.>']"),
        ({"max_age": "1d", "deletes_old_events": True}, "max_age lowered"),
        ({"max_age": "1d"}, "would delete events (max_age"),
        ({"discard": "old"}, "max_bytes with discard old deletes the oldest events"),
        ({"deny_purge": False}, "deny_purge false lets clients purge"),
        ({"max_msg_size": "1KB"}, "max_msg_size lowered"),
    ]
    for harmful, words in harmful_changes:
        code, outcome, output = apply(tmp_path, server_url, [bigger | harmful])
        assert code != 0, f"{harmful} was applied"
        assert words in output, output[-2000:]
        assert stream_info(server_url)["config"]["max_bytes"] == 512 << 20
    aging = bigger | {"max_age": "1d", "deletes_old_events": True}
    code, outcome, output = apply(tmp_path, server_url, [aging], allow_destructive=True)
    assert code == 0 and outcome["updated"] == ["LOCAL_EVENTS"], output[-2000:]
    assert stream_info(server_url)["config"]["max_age"] == 86400 * 10**9

    code, outcome, output = apply(tmp_path, server_url, [bigger | {"replicas": "three"}])
    assert code != 0 and "replicas" in output and "not a whole number" in output


def test_streams_not_declared_are_left_alone(tmp_path: Path, server_url: str) -> None:
    async def make_other() -> None:
        nc = await nats.connect(server_url)
        await nc.jetstream().add_stream(name="UNDECLARED", subjects=["undeclared.>"])
        await nc.close()

    asyncio.run(make_other())
    code, _outcome, output = apply(
        tmp_path, server_url, [STREAM | {"max_bytes": "512MB", "subjects": ["local.>", "more.>"]}]
    )
    assert code == 0, output[-2000:]

    async def names() -> list[str]:
        nc = await nats.connect(server_url)
        found = [s.config.name or "" for s in await nc.jetstream().streams_info()]
        await nc.close()
        return found

    assert "UNDECLARED" in asyncio.run(names())


def test_refused_declaration_changes_no_stream(tmp_path: Path, server_url: str) -> None:
    """A bad declaration after a good one: nothing is created, and the message names the stream."""
    good = STREAM | {"name": "FIRST_OK", "subjects": ["firstok.>"], "consumers": []}
    bad = STREAM | {"name": "DELETES", "subjects": ["deletes.>"], "max_age": "7d", "consumers": []}
    code, _outcome, output = apply(tmp_path, server_url, [good, bad])
    assert code != 0 and "stream DELETES would delete events" in output, output[-2000:]

    async def exists(name: str) -> bool:
        nc = await nats.connect(server_url)
        try:
            await nc.jetstream().stream_info(name)
            return True
        except nats.js.errors.NotFoundError:
            return False
        finally:
            await nc.close()

    assert not asyncio.run(exists("FIRST_OK")), "a stream was created although the declaration was refused"


def test_migration_from_a_deleting_stream_keeps_every_event(tmp_path: Path, server_url: str) -> None:
    """Today's production stream (30 d max age, max_bytes with discard old, 1 h consumer default) with
    events in it, then the new declaration: every event stays, nothing deletes them any more."""
    old = {
        "name": "MIGRATED",
        "subjects": ["migrated.>"],
        "storage": "file",
        "num_replicas": 1,
        "retention": "limits",
        "max_age": 30 * 86400 * 10**9,
        "max_bytes": 1 << 30,
        "discard": "old",
        "consumer_limits": {"inactive_threshold": 3600 * 10**9},
    }

    async def create_old() -> list[int]:
        nc = await nats.connect(server_url)
        js = nc.jetstream()
        await nc.request("$JS.API.STREAM.CREATE.MIGRATED", json.dumps(old).encode(), timeout=5)
        seqs = [(await js.publish(f"migrated.compute.{n % 3}.created", f"event-{n}".encode())).seq for n in range(30)]
        await nc.close()
        return seqs

    seqs = asyncio.run(create_old())
    declared = {"name": "MIGRATED", "subjects": ["migrated.>"], "storage": "file", "replicas": 1, "max_bytes": "1GB"}
    code, outcome, output = apply(tmp_path, server_url, [declared])
    assert code == 0 and outcome["updated"] == ["MIGRATED"], output[-3000:]

    async def read_back() -> tuple[dict[str, Any], list[bytes]]:
        nc = await nats.connect(server_url)
        js = nc.jetstream()
        info = await js.stream_info("MIGRATED")
        bodies = [(await js.get_msg("MIGRATED", seq)).data or b"" for seq in seqs]
        await nc.close()
        return info.config.as_dict(), bodies

    config, bodies = asyncio.run(read_back())
    assert bodies == [f"event-{n}".encode() for n in range(30)]
    assert config["max_age"] == 0 and config["discard"] == "new"
    assert config["deny_delete"] and config["deny_purge"]
    assert not (config.get("consumer_limits") or {}).get("inactive_threshold")
    code, outcome, output = apply(tmp_path, server_url, [declared])
    assert code == 0 and not outcome["changed"], outcome
