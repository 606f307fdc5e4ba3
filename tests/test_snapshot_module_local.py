"""The jetstream_snapshot module against real nats-servers on loopback: save, restore with every
message (sequence, subject, data, headers, timestamp) and consumer state kept, refusal to restore
over existing streams or from a tampered file, check mode, and restore into a fresh server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml

from tests.helpers import REPO, ansible_env, load_plugin_module, run_playbook
from tests.local_nats import local_jetstream

EVENTS, BIG = "SNAP_EVENTS", "SNAP_BIG"
# An empty stream: its first_seq differs after a restore (0 vs 1) and must not count.
EMPTY = "SNAP_EMPTY"
SUBJECTS = ("snap.orders.created", "snap.orders.shipped", "snap.audit")
# First, middle and last messages deleted: sequences must come back with the same gaps.
DELETED = (1, 150, 300)
# Incompressible data above the server's 8 MiB flow-control window and 128 KiB chunks.
BIG_MESSAGES, BIG_SIZE = 160, 64 * 1024


@dataclass
class Source:
    url: str
    streams: dict[str, Any]
    consumer: dict[str, Any]


def snapshot_module(tmp_path: Path, url: str, *args: str, **options: Any) -> tuple[int, dict[str, Any], str]:
    playbook = tmp_path / "snapshot.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Snapshots on a local server",
                    "hosts": "localhost",
                    "connection": "local",
                    "gather_facts": False,
                    "vars": {"ansible_python_interpreter": "{{ ansible_playbook_python }}"},
                    "tasks": [
                        {"name": "Snapshot", "jetstream_snapshot": {"servers": [url], **options}, "register": "result"}
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
        outcome = json.loads(result.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]
    except (ValueError, KeyError, IndexError):
        outcome = {}
    return result.returncode, outcome, result.stdout + result.stderr


async def api(nc: Any, subject: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    reply = await nc.request(subject, json.dumps(payload).encode() if payload else b"", timeout=5)
    return dict(json.loads(reply.data))


async def dump_stream(nc: Any, stream: str) -> dict[str, Any]:
    """State and every sequence from first to last: (subject, data, raw headers, time) or None."""
    state = (await api(nc, f"$JS.API.STREAM.INFO.{stream}"))["state"]
    messages = {}
    for seq in range(state["first_seq"], state["last_seq"] + 1):
        found = (await api(nc, f"$JS.API.STREAM.MSG.GET.{stream}", {"seq": seq})).get("message")
        messages[seq] = found and (found["subject"], found.get("data"), found.get("hdrs"), found["time"])
    # Not last_ts: with the last message deleted, 2.15.1 restores the tail as a skip and reports the
    # timestamp of the last message still stored rather than of the deleted one.
    keys = ("messages", "bytes", "first_seq", "last_seq", "first_ts", "num_deleted", "num_subjects")
    return {"state": {key: state.get(key) for key in keys}, "messages": messages}


async def consumer_state(nc: Any) -> dict[str, Any]:
    info = await api(nc, f"$JS.API.CONSUMER.INFO.{EVENTS}.projector")
    state = {key: info[key] for key in ("config", "num_pending", "num_ack_pending")}
    # Positions, not last_active: a restored consumer has delivered nothing yet.
    for key in ("delivered", "ack_floor"):
        state[key] = {k: v for k, v in info[key].items() if k != "last_active"}
    return state


def read(url: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    async def go() -> tuple[dict[str, Any], dict[str, Any] | None]:
        nc = await nats.connect(url)
        names = (await api(nc, "$JS.API.STREAM.NAMES")).get("streams") or []
        streams = {name: await dump_stream(nc, name) for name in sorted(names)}
        consumer = await consumer_state(nc) if EVENTS in streams else None
        if consumer is not None:
            consumer["config"].pop("metadata", None)  # the server stamps its own version on create
        await nc.close()
        return streams, consumer

    return asyncio.run(go())


def populate(url: str) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(name=EVENTS, subjects=["snap.>"], storage="file")
        for n in range(1, 301):
            headers = {"Nats-Msg-Id": f"event-{n}", "X-Trace": f"trace-{n}"} if n % 4 == 0 else None
            await js.publish(SUBJECTS[n % 3], f"event {n}".encode(), headers=headers)
        for seq in DELETED:
            await js.delete_msg(EVENTS, seq)
        await js.add_consumer(EVENTS, durable_name="projector", ack_policy="explicit", filter_subject="snap.orders.>")
        pull = await js.pull_subscribe_bind("projector", stream=EVENTS)
        for msg in await pull.fetch(10, timeout=5):
            await msg.ack_sync()
        await pull.unsubscribe()
        await js.add_stream(name=BIG, subjects=["big.>"], storage="file")
        for _ in range(BIG_MESSAGES):
            await js.publish("big.blob", os.urandom(BIG_SIZE))
        await nc.close()

    asyncio.run(go())


def delete_stream(url: str, name: str) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        await nc.jetstream().delete_stream(name)
        await nc.close()

    asyncio.run(go())


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    with local_jetstream(tmp_path_factory.mktemp("nats-source")) as url:
        populate(url)
        streams, consumer = read(url)
        assert consumer is not None
        yield Source(url, streams, consumer)


@pytest.fixture(scope="module")
def backup(source: Source, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("backup") / "reset-1"
    code, outcome, output = snapshot_module(path.parent, source.url, state="saved", path=str(path))
    assert code == 0 and outcome["changed"], output[-3000:]
    return path


def test_source_has_the_edge_cases(source: Source) -> None:
    events = source.streams[EVENTS]
    assert [seq for seq, found in events["messages"].items() if found is None] == [150, 300]
    assert events["state"]["first_seq"] == 2 and events["state"]["last_seq"] == 300
    assert any(found and found[2] for found in events["messages"].values()), "no message has headers"
    assert source.consumer["ack_floor"]["stream_seq"] > 0


def test_save_check_mode_writes_nothing(source: Source, tmp_path: Path) -> None:
    path = tmp_path / "never"
    code, outcome, output = snapshot_module(tmp_path, source.url, "--check", state="saved", path=str(path))
    assert code == 0 and outcome["changed"], output[-3000:]
    assert not path.exists()
    assert {s["name"]: s["messages"] for s in outcome["streams"]} == {BIG: BIG_MESSAGES, EVENTS: 297}


def test_saved_files_match_the_manifest(source: Source, backup: Path) -> None:
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["created"].endswith("Z") and manifest["server_version"].startswith("2.")
    entries = {entry["name"]: entry for entry in manifest["streams"]}
    assert set(entries) == {EVENTS, BIG}
    for name, entry in entries.items():
        snapshot = backup / f"{name}.snapshot"
        assert entry["snapshot_bytes"] == snapshot.stat().st_size
        assert entry["sha256"] == hashlib.sha256(snapshot.read_bytes()).hexdigest()
        state = source.streams[name]["state"]
        assert (entry["messages"], entry["first_seq"], entry["last_seq"]) == (
            state["messages"],
            state["first_seq"],
            state["last_seq"],
        )
        meta = json.loads((backup / f"{name}.json").read_text())
        assert meta["config"]["name"] == name and meta["state"]["last_seq"] == state["last_seq"]
    assert entries[BIG]["snapshot_bytes"] > BIG_MESSAGES * BIG_SIZE, "the big stream fit in one window"
    assert entries[EVENTS]["consumers"] == 1

    # A second save into the same directory must not replace the backup.
    before = {f.name: f.read_bytes() for f in backup.iterdir()}
    code, outcome, output = snapshot_module(backup.parent, source.url, state="saved", path=str(backup))
    assert code != 0 and "already holds a backup" in outcome.get("msg", ""), output[-2000:]
    assert {f.name: f.read_bytes() for f in backup.iterdir()} == before


def test_restore_over_existing_streams(source: Source, backup: Path, tmp_path: Path) -> None:
    code, outcome, output = snapshot_module(tmp_path, source.url, state="restored", path=str(backup))
    assert code != 0, output[-2000:]
    assert "already exist" in outcome["msg"] and EVENTS in outcome["msg"] and BIG in outcome["msg"]
    assert read(source.url) == (source.streams, source.consumer)

    delete_stream(source.url, EVENTS)
    code, outcome, output = snapshot_module(
        tmp_path, source.url, "--check", state="restored", path=str(backup), existing="skip"
    )
    assert code == 0 and outcome["changed"], output[-2000:]
    assert [s["name"] for s in outcome["streams"]] == [EVENTS] and outcome["skipped_streams"] == [BIG]
    assert EVENTS not in read(source.url)[0], "check mode restored the stream"

    # Restore only the stream data: the consumer the snapshot carries is removed again.
    code, outcome, output = snapshot_module(
        tmp_path, source.url, state="restored", path=str(backup), existing="skip", include_consumers=False
    )
    assert code == 0 and outcome["changed"], output[-3000:]
    assert [s["name"] for s in outcome["streams"]] == [EVENTS] and outcome["skipped_streams"] == [BIG]
    streams, consumer = read_without_consumer(source.url)
    assert streams == source.streams
    assert consumer == []


def read_without_consumer(url: str) -> tuple[dict[str, Any], list[str]]:
    async def go() -> tuple[dict[str, Any], list[str]]:
        nc = await nats.connect(url)
        streams = {name: await dump_stream(nc, name) for name in (BIG, EVENTS)}
        consumers = (await api(nc, f"$JS.API.CONSUMER.NAMES.{EVENTS}")).get("consumers") or []
        await nc.close()
        return streams, consumers

    return asyncio.run(go())


def corrupt_copy(backup: Path, target: Path, stream: str, fix_manifest: bool) -> Path:
    """A copy of the backup with one flipped bit in a snapshot; its manifest entry optionally made to
    match, so the damage only shows once the server reads the archive."""
    shutil.copytree(backup, target)
    snapshot = target / f"{stream}.snapshot"
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0x01
    snapshot.write_bytes(bytes(data))
    if fix_manifest:
        manifest = json.loads((target / "manifest.json").read_text())
        for entry in manifest["streams"]:
            if entry["name"] == stream:
                entry["sha256"] = hashlib.sha256(data).hexdigest()
        (target / "manifest.json").write_text(json.dumps(manifest))
    return snapshot


def test_restore_into_a_fresh_server(source: Source, backup: Path, tmp_path: Path) -> None:
    snapshot = corrupt_copy(backup, tmp_path / "tampered", EVENTS, fix_manifest=False)
    rehashed = corrupt_copy(backup, tmp_path / "rehashed", BIG, fix_manifest=True).parent

    (tmp_path / "fresh").mkdir()
    with local_jetstream(tmp_path / "fresh") as fresh:
        # SNAP_BIG sorts first and is intact: it must not be restored either.
        code, outcome, output = snapshot_module(tmp_path, fresh, state="restored", path=str(snapshot.parent))
        assert code != 0 and not outcome.get("changed"), output[-2000:]
        assert f"{snapshot} does not match its sha256" in outcome["msg"], outcome.get("msg")
        assert read(fresh) == ({}, None)

        # The server rejects the archive part way: the partial stream it leaves is removed.
        code, outcome, output = snapshot_module(tmp_path, fresh, state="restored", path=str(rehashed))
        assert code != 0 and not outcome.get("changed"), output[-2000:]
        assert (
            f"{BIG}: the server rejected the restore" in outcome["msg"]
            and "partial stream it left was deleted" in outcome["msg"]
        )
        assert read(fresh) == ({}, None)

        code, outcome, output = snapshot_module(tmp_path, fresh, state="restored", path=str(backup))
        assert code == 0 and outcome["changed"], output[-3000:]
        assert sorted(s["name"] for s in outcome["streams"]) == [BIG, EVENTS]
        assert read(fresh) == (source.streams, source.consumer)


def test_only_the_streams_own_limits_excuse_missing_messages() -> None:
    aged_out = load_plugin_module("jetstream_snapshot").aged_out
    now = datetime(2026, 6, 1, tzinfo=UTC)
    entry = {"messages": 100, "first_seq": 1, "last_seq": 100}
    day = 86400 * 10**9
    meta = {"config": {"max_age": day}, "state": {"first_ts": "2026-05-30T00:00:00.123456789Z"}}
    head_gone = {"messages": 90, "first_seq": 11, "last_seq": 100}
    assert aged_out(entry, meta, head_gone, now) == 10
    assert aged_out(entry, meta, head_gone | {"last_seq": 99}, now) is None, "tail lost"
    assert aged_out(entry, meta, head_gone | {"first_seq": 1}, now) is None, "middle lost"
    assert aged_out(entry, meta, head_gone, datetime(2026, 5, 30, 12, tzinfo=UTC)) is None, "nothing old enough yet"
    assert aged_out(entry, {"config": {"max_age": 0}, "state": meta["state"]}, head_gone, now) is None
    ttl = {"config": {"allow_msg_ttl": True}, "state": {}}
    assert aged_out(entry, ttl, {"messages": 95, "first_seq": 1, "last_seq": 100}, now) == 5
    assert aged_out(entry, meta, entry, now) is None, "nothing missing: the exact comparison applies"


def test_an_empty_stream_round_trips(tmp_path: Path) -> None:
    """An empty stream reports first_seq 0 when saved and 1 once restored: still a match."""
    (tmp_path / "server").mkdir()
    with local_jetstream(tmp_path / "server") as url:

        async def create() -> None:
            nc = await nats.connect(url)
            await nc.jetstream().add_stream(name=EMPTY, subjects=["empty.>"], storage="file")
            await nc.close()

        asyncio.run(create())
        code, outcome, output = snapshot_module(tmp_path, url, state="saved", path=str(tmp_path / "backup"))
        assert code == 0, output[-2000:]
        delete_stream(url, EMPTY)
        code, outcome, output = snapshot_module(tmp_path, url, state="restored", path=str(tmp_path / "backup"))
        assert code == 0 and outcome["changed"], output[-2000:]
        assert [(s["name"], s["messages"]) for s in outcome["streams"]] == [(EMPTY, 0)]


def test_a_restore_chunk_waits_for_a_late_subscriber(tmp_path: Path) -> None:
    """In a cluster the deliver subject's subscriber can show up just after the client learns the
    subject: the chunk is sent again until it is heard, and heard exactly once."""
    snapshot = load_plugin_module("jetstream_snapshot")
    with local_jetstream(tmp_path) as url:

        async def go() -> tuple[list[bytes], float]:
            sender, receiver = await nats.connect(url), await nats.connect(url)
            heard: list[bytes] = []

            async def answer(msg: Any) -> None:
                heard.append(msg.data)
                await msg.respond(b"")

            async def subscribe_late() -> None:
                await asyncio.sleep(0.5)
                await receiver.subscribe("restore.late", cb=answer)
                await receiver.flush()

            started = asyncio.get_running_loop().time()
            late = asyncio.create_task(subscribe_late())
            reply = await snapshot.send_chunk(sender, "restore.late", b"chunk-1", timeout=2)
            waited = asyncio.get_running_loop().time() - started
            await late
            assert reply.data == b""
            await asyncio.sleep(0.2)  # a doubled chunk would arrive by now
            await sender.close()
            await receiver.close()
            return heard, waited

        heard, waited = asyncio.run(go())
    assert heard == [b"chunk-1"]
    assert 0.5 <= waited < snapshot.UNHEARD_CHUNK_RETRY


def test_a_restore_chunk_nobody_hears_fails_naming_the_subject(tmp_path: Path) -> None:
    snapshot = load_plugin_module("jetstream_snapshot")
    with local_jetstream(tmp_path) as url:

        async def go() -> str:
            nc = await nats.connect(url)
            try:
                await snapshot.send_chunk(nc, "restore.gone", b"chunk-1", timeout=2, retry_for=0.5)
            except snapshot.NoResponders as error:
                return str(error)
            finally:
                await nc.close()
            raise AssertionError("a chunk nobody heard was reported as delivered")

        message = asyncio.run(go())
    assert message == "restore.gone: no responders for 0.5 s (the server abandoned the restore?)"
