"""The jetstream_streams module against a real single-node nats-server on loopback: create,
in-place update with data kept, refusal of destructive and impossible changes, check mode,
idempotence (also for the values the server rewrites), the keep-every-event defaults, all or
nothing (a bad declaration, an account without room), errors naming the stream, and the
migration of a stream that deleted events by age and size."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import nats
import pytest
import yaml

from tests.helpers import NATS_SERVER, REPO, ansible_env, load_plugin_module, run_playbook
from tests.local_nats import free_port, local_jetstream

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


def play(
    tmp_path: Path, server_url: str, runs: list[list[Any]], *args: str, allow_destructive: bool = False
) -> tuple[int, list[dict[str, Any]], str]:
    """One playbook, one jetstream_streams task per declaration in `runs` (each may fail without
    stopping the others); every task's result, and the whole output."""
    tasks = [
        {
            "name": f"Apply {n}",
            "jetstream_streams": {"servers": [server_url], "streams": streams, "allow_destructive": allow_destructive},
            "ignore_errors": len(runs) > 1,
        }
        for n, streams in enumerate(runs)
    ]
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
                    "tasks": tasks,
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
        outcomes = [task["hosts"]["localhost"] for task in json.loads(result.stdout)["plays"][0]["tasks"]]
    except (ValueError, KeyError, IndexError):
        outcomes = []
    return result.returncode, outcomes, result.stdout + result.stderr


def apply(
    tmp_path: Path, server_url: str, streams: list[Any], *args: str, allow_destructive: bool = False
) -> tuple[int, dict[str, Any], str]:
    code, outcomes, output = play(tmp_path, server_url, [streams], *args, allow_destructive=allow_destructive)
    return code, (outcomes or [{}])[0], output


def stream_info(server_url: str, name: str = "LOCAL_EVENTS") -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        nc = await nats.connect(server_url)
        info = await nc.jetstream().stream_info(name)
        await nc.close()
        return {"config": info.config.as_dict(), "messages": info.state.messages}

    return asyncio.run(read())


def stream_names(server_url: str) -> set[str]:
    async def read() -> set[str]:
        nc = await nats.connect(server_url)
        reply = await nc.request("$JS.API.STREAM.NAMES", b"{}")
        await nc.close()
        return set(json.loads(reply.data).get("streams") or [])

    return asyncio.run(read())


def publish(server_url: str, count: int, subject: str = "local.x") -> None:
    async def send() -> None:
        nc = await nats.connect(server_url)
        js = nc.jetstream()
        for n in range(count):
            await js.publish(subject, str(n).encode())
        await nc.close()

    asyncio.run(send())


def delete_streams(server_url: str, *names: str) -> None:
    async def delete() -> None:
        nc = await nats.connect(server_url)
        for name in names:
            await nc.request(f"$JS.API.STREAM.DELETE.{name}", b"")
        await nc.close()

    asyncio.run(delete())


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

    # Each refused (one playbook, one task each); the stream stays as it was.
    harmful_changes: list[tuple[dict[str, Any], str]] = [
        ({"storage": "memory"}, "storage file -> memory: NATS cannot change it in place"),
        ({"subjects": ["more.>"], "consumers": []}, "subjects removed ['local.>']"),
        ({"max_age": "1d", "deletes_old_events": True}, "max_age lowered none -> 1d"),
        ({"max_age": "1d"}, "would delete events (max_age"),
        ({"discard": "old"}, "max_bytes with discard old deletes the oldest events"),
        ({"deny_purge": False}, "deny_purge false lets clients purge"),
        ({"deny_purge": False, "deletes_old_events": True}, "deny_purge true -> false: the server never turns it off"),
        ({"max_msg_size": "1KB"}, "max_msg_size lowered unlimited -> 1KB"),
        ({"max_bytes": "100B"}, "max_bytes lowered 512MB -> 100B, below the"),
        ({"max_msgs": 2}, "max_msgs lowered unlimited -> 2, below the 5 messages it holds"),
        ({"max_msgs_per_subject": 1}, "max_msgs_per_subject deletes a subject's oldest events"),
        ({"allow_atomic": False}, "allow_atomic true -> false (atomic batch appends are refused)"),
        ({"retention": "workqueue", "deletes_old_events": True}, "the server cannot change retention to or from"),
        (
            {"consumers": [{"name": "projector", "ack_policy": "none"}]},
            "consumer projector: ack_policy explicit -> none",
        ),
    ]
    code, outcomes, output = play(tmp_path, server_url, [[bigger | harmful] for harmful, _ in harmful_changes])
    assert len(outcomes) == len(harmful_changes), output[-3000:]
    for (harmful, words), outcome in zip(harmful_changes, outcomes, strict=True):
        assert outcome.get("failed"), f"{harmful} was applied"
        assert words in outcome["msg"], (harmful, outcome["msg"])
        assert "LOCAL_EVENTS" in outcome["msg"], outcome["msg"]
    assert "Traceback" not in output
    assert stream_info(server_url) == after, "a refused change changed the stream"

    aging = bigger | {"max_age": "1d", "deletes_old_events": True}
    code, outcome, output = apply(tmp_path, server_url, [aging], allow_destructive=True)
    assert code == 0 and outcome["updated"] == ["LOCAL_EVENTS"], output[-2000:]
    assert stream_info(server_url)["config"]["max_age"] == 86400 * 10**9

    code, outcome, output = apply(tmp_path, server_url, [bigger | {"replicas": "three"}])
    assert code != 0 and "stream LOCAL_EVENTS: replicas: not a whole number: 'three'" in outcome["msg"]


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
    assert "UNDECLARED" in stream_names(server_url)


GOOD = STREAM | {"name": "FIRST_OK", "subjects": ["firstok.>"], "consumers": []}
# Each after GOOD in one declaration: refused before anything is created. (declaration, message)
BAD_AFTER_GOOD: list[tuple[Any, str]] = [
    ({"name": "DELETES", "subjects": ["deletes.>"], "max_age": "7d"}, "stream DELETES would delete events"),
    ({"name": "a.b", "subjects": ["ab.>"]}, "stream name 'a.b' must be 1-255 letters"),
    ({"name": "R", "subjects": ["r.>"], "replicas": "three"}, "stream R: replicas: not a whole number: 'three'"),
    (
        {"name": "W", "subjects": ["w.>"], "max_age": "1m", "duplicate_window": "5m", "deletes_old_events": True},
        "stream W: duplicate_window 5m is longer than max_age 1m",
    ),
    ({"name": "C", "subjects": ["c.>"], "consumers": [{"name": "read.model"}]}, "stream C: consumer name 'read.model'"),
    (
        {"name": "A", "subjects": ["a.>"], "consumers": [{"name": "slow", "ack_wait": "5 minutes"}]},
        "stream A: consumer slow: ack_wait: not a duration: '5 minutes'",
    ),
    ({"name": "FIRST_OK", "subjects": ["other.>"]}, "stream FIRST_OK is declared twice"),
    ({"name": "SHARES", "subjects": ["firstok.x"]}, "streams FIRST_OK and SHARES overlap in subjects"),
    ("SOMETHING", "a declared stream must be a mapping"),
]


def test_a_bad_declaration_after_a_good_one_creates_nothing(tmp_path: Path, server_url: str) -> None:
    """All or nothing: every declaration is read before anything is sent, and the message names
    the stream (and the consumer) and the key."""
    before = stream_names(server_url)
    runs = [[GOOD, STREAM | {"consumers": []} | bad if isinstance(bad, dict) else bad] for bad, _ in BAD_AFTER_GOOD]
    _, outcomes, output = play(tmp_path, server_url, runs)
    assert len(outcomes) == len(runs), output[-3000:]
    for (bad, words), outcome in zip(BAD_AFTER_GOOD, outcomes, strict=True):
        assert outcome.get("failed"), f"{bad} was accepted"
        message = outcome["msg"]
        assert message.startswith("Bad stream declaration, nothing applied: "), message
        assert words in message and "\n" not in message, (words, message)
    assert "Traceback" not in output
    assert stream_names(server_url) == before, "a stream was created although the declaration was refused"


def test_a_server_refusal_midway_names_the_stream_and_what_was_applied(tmp_path: Path, server_url: str) -> None:
    """A refusal only the server knows (a single server takes no R3 stream): the run stops there,
    naming the stream, the server's words and err_code, and what it had applied before."""
    first = GOOD | {"name": "BEFORE_R3", "subjects": ["beforer3.>"]}
    r3 = GOOD | {"name": "NEEDS_THREE", "subjects": ["needsthree.>"], "replicas": 3}
    last = GOOD | {"name": "AFTER_R3", "subjects": ["afterr3.>"]}
    try:
        code, outcome, _ = apply(tmp_path, server_url, [first, r3, last])
        assert code != 0
        assert outcome["msg"] == (
            "stream NEEDS_THREE: replicas > 1 not supported in non-clustered mode (err_code 10074); "
            "applied before it: created BEFORE_R3; not applied: AFTER_R3"
        ), outcome["msg"]
        assert outcome["created"] == ["BEFORE_R3"]
        assert {"BEFORE_R3", "NEEDS_THREE", "AFTER_R3"} & stream_names(server_url) == {"BEFORE_R3"}
    finally:
        delete_streams(server_url, "BEFORE_R3")


NORMALISED: dict[str, Any] = {
    "name": "NORMALISED",
    "subjects": ["normalised.>"],
    "storage": "file",
    "replicas": 1,
    "max_bytes": 0,
    "max_msgs": 0,
    "max_msgs_per_subject": 0,
    "max_msg_size": 0,
    "max_consumers": 0,
    "max_age": 0,
    "duplicate_window": 0,
    "description": "",
    "consumer_inactive_threshold": 0,
    "consumers": [
        {"name": "zeros", "ack_wait": 0, "max_ack_pending": 0, "max_deliver": 0, "inactive_threshold": 0},
        {"name": "plain", "description": "", "filter_subject": "normalised.x", "deliver_policy": "all"},
    ],
}


def test_values_the_server_rewrites_report_no_change_on_the_second_run(tmp_path: Path, server_url: str) -> None:
    """0 for unlimited (the server stores -1), a 0 duplicate window (the server's 2m), an empty
    description (left out), 0 consumer values (the server's defaults): applied once, unchanged after."""
    try:
        code, (first, second), output = play(tmp_path, server_url, [[NORMALISED], [NORMALISED]])
        assert code == 0, output[-3000:]
        assert first["created"] == ["NORMALISED", "NORMALISED/zeros", "NORMALISED/plain"], first
        assert not second["changed"] and second["updated"] == [], second
        config = stream_info(server_url, "NORMALISED")["config"]
        assert config["max_bytes"] == -1 and config["duplicate_window"] == 120 * 10**9
    finally:
        delete_streams(server_url, "NORMALISED")


@contextmanager
def server_with_account(workdir: Path) -> Iterator[str]:
    """A server whose account has JetStream limits as the deploy sets them (max_file 1GB, 3 streams)."""
    port = free_port()
    config = workdir / "account.conf"
    config.write_text(
        f'listen: "127.0.0.1:{port}"\n'
        f'jetstream {{ store_dir: "{workdir}/store", max_file_store: 10GB, max_memory_store: 64MB }}\n'
        "accounts { APP { jetstream: { max_file: 1GB, max_memory: 32MB, max_streams: 3, max_consumers: 8 },"
        " users: [{ user: admin, password: admin-password }] } }\n"
    )
    process = subprocess.Popen([str(NATS_SERVER), "-c", str(config)], stderr=subprocess.DEVNULL)
    url = f"nats://admin:admin-password@127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def load_module() -> ModuleType:
    return cast(ModuleType, load_plugin_module("jetstream_streams"))


def run_module(url: str, streams: list[Any], check_mode: bool = False, **options: Any) -> dict[str, Any] | str:
    """The module's run in-process: its result, or the message it fails with."""
    module = load_module()
    params = {"servers": [url], "user": None, "password": None, "tls_ca_file": None, "streams": streams}
    params |= {"allow_destructive": False, "timeout": 5.0} | options
    try:
        return cast(dict[str, Any], asyncio.run(module.run(params, check_mode, module.Outcome())))
    except module.Refused as error:
        return str(error)


def sized(name: str, size: str) -> dict[str, Any]:
    return {"name": name, "subjects": [f"{name.lower()}.>"], "storage": "file", "replicas": 1, "max_bytes": size}


def test_an_account_without_room_for_the_declaration_changes_nothing(tmp_path: Path) -> None:
    """The account's limits as the server reports them, against all its streams after the change:
    a declaration that does not fit is refused before the first stream is created."""
    with server_with_account(tmp_path) as url:
        message = run_module(url, [sized("FIRST", "512MB"), sized("SECOND", "768MB")])
        assert message == (
            "Refusing changes the server cannot make: streams FIRST, SECOND: the account's file streams would "
            "reserve 1280MB (max_bytes x replicas), more than its max_storage 1GB "
            "(nats_server_app_jetstream_limits.max_file); the server would refuse them. Nothing applied"
        ), message
        assert stream_names(url) == set()
        four = [sized(f"S{n}", "100MB") for n in range(4)]
        message = run_module(url, four)
        assert isinstance(message, str) and message.startswith(
            "Refusing changes the server cannot make: streams S0, S1, S2, S3: the account would hold 4 streams, "
            "more than its max_streams 3"
        ), message
        assert stream_names(url) == set()
        done = run_module(url, [sized("FIRST", "512MB"), sized("SECOND", "256MB")])
        assert isinstance(done, dict) and done["created"] == ["FIRST", "SECOND"], done
        # Growing one past the account: refused, the other streams' reservations counted.
        message = run_module(url, [sized("SECOND", "768MB")])
        assert isinstance(message, str) and "streams SECOND: the account's file streams would reserve 1280MB" in message
        assert stream_info(url, "SECOND")["config"]["max_bytes"] == 256 << 20


def test_the_server_deletes_per_subject_even_with_discard_new(server_url: str) -> None:
    """Why max_msgs_per_subject needs deletes_old_events whatever the discard policy, and why a
    lowered max_msgs with discard new is destructive although it deletes nothing (nats-server 2.15.1)."""

    async def scenario() -> tuple[int, int, str]:
        nc = await nats.connect(server_url)
        js = nc.jetstream()
        body = {"name": "PER_SUBJECT", "subjects": ["persubject.>"], "discard": "new", "max_msgs_per_subject": 1}
        await nc.request("$JS.API.STREAM.CREATE.PER_SUBJECT", json.dumps(body).encode())
        for n in range(3):
            await js.publish("persubject.a", str(n).encode())
        kept = (await js.stream_info("PER_SUBJECT")).state.messages
        body = {"name": "LOWERED", "subjects": ["lowered.>"], "discard": "new"}
        await nc.request("$JS.API.STREAM.CREATE.LOWERED", json.dumps(body).encode())
        for n in range(5):
            await js.publish("lowered.a", str(n).encode())
        await nc.request("$JS.API.STREAM.UPDATE.LOWERED", json.dumps(body | {"max_msgs": 2}).encode())
        left = (await js.stream_info("LOWERED")).state.messages
        try:
            await js.publish("lowered.a", b"one more")
            refused = ""
        except nats.js.errors.APIError as error:
            refused = str(error)
        await nc.close()
        return kept, left, refused

    try:
        kept, left, refused = asyncio.run(scenario())
    finally:
        delete_streams(server_url, "PER_SUBJECT", "LOWERED")
    assert kept == 1, "discard new kept a subject's older events"
    assert left == 5 and "maximum messages exceeded" in refused


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
