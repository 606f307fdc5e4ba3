"""The backup and restore runbooks' role (roles/jetstream_backup) against real nats-servers on
loopback: a new set per run, the newest N kept and nothing else removed, a set published only once
complete, the backup directory refused on the JetStream share; a restore that fills missing and
empty streams, refuses a stream holding data (naming it, restoring nothing), overwrites one only
when named and confirmed (saving it first); a drill that restores into a scratch server and leaves
the live server as it was, R3 sets included.

The role runs as the playbooks run it, minus the inventory preflight and the health gate: an
inventory whose one host, localhost (connection local), is the whole nats_cluster group, with the
endpoints nats_server would publish pointing at the local server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml

from tests.helpers import (
    BIN,
    NATS_SERVER,
    NATS_SERVER_VERSION,
    REPO,
    ansible_env,
    load_filter_plugin,
    load_plugin_module,
)
from tests.local_nats import free_port, local_jetstream, local_trio

EVENTS, OTHER, EMPTY = "BK_EVENTS", "BK_OTHER", "BK_EMPTY"
CLUSTER = "local"
PREFLIGHT = {
    "name": "Preflight",
    "ansible.builtin.include_role": {"name": "jetstream_backup", "tasks_from": "preflight"},
}
BACKUP = [PREFLIGHT, {"name": "Backup", "ansible.builtin.include_role": {"name": "jetstream_backup"}}]
RESTORE = [
    PREFLIGHT,
    {"name": "Restore", "ansible.builtin.include_role": {"name": "jetstream_backup", "tasks_from": "restore"}},
]


def play(
    tmp_path: Path, url: str, tasks: list[dict[str, Any]], *args: str, **settings: Any
) -> subprocess.CompletedProcess[str]:
    """The tasks on an inventory whose nats_cluster is localhost, the local server's endpoints."""
    host = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "nats_server_endpoints": {"client_url": url, "client_user": "", "client_ca_file": ""},
        "nats_server_app_admin_password": "",
        "nats_server_cluster_name": CLUSTER,
        "jetstream_storage_mount_path": "/mnt/cimstor-jetstream",
        "jetstream_backup_dir": str(tmp_path / "backups"),
    } | settings
    inventory, playbook = tmp_path / "inventory.yml", tmp_path / "play.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"nats_cluster": {"hosts": {"localhost": host}}}}}))
    playbook.write_text(
        yaml.safe_dump([{"name": "Local", "hosts": "nats_cluster", "gather_facts": False, "tasks": tasks}])
    )
    # Not tests.helpers.run_playbook: an inventory file would run in an empty network namespace,
    # where the local server on this machine's loopback cannot be reached. Its only host is
    # localhost over the local connection, so nothing leaves the machine.
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory), str(playbook), *args],
        cwd=REPO,
        env=ansible_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def flat(result: subprocess.CompletedProcess[str]) -> str:
    return " ".join((result.stdout + result.stderr).split())


async def api(nc: Any, subject: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    reply = await nc.request(subject, json.dumps(payload).encode() if payload else b"", timeout=5)
    return dict(json.loads(reply.data))


async def dump(nc: Any) -> dict[str, Any]:
    """Every stream: state, config subjects, every message (subject, data, headers, time), consumers."""
    streams = {}
    for name in sorted((await api(nc, "$JS.API.STREAM.NAMES")).get("streams") or []):
        info = await api(nc, f"$JS.API.STREAM.INFO.{name}")
        state = info["state"]
        messages = {}
        for seq in range(state["first_seq"], state["last_seq"] + 1):
            found = (await api(nc, f"$JS.API.STREAM.MSG.GET.{name}", {"seq": seq})).get("message")
            messages[seq] = found and (found["subject"], found.get("data"), found.get("hdrs"), found["time"])
        consumers = {}
        for consumer in (await api(nc, f"$JS.API.CONSUMER.NAMES.{name}")).get("consumers") or []:
            ci = await api(nc, f"$JS.API.CONSUMER.INFO.{name}.{consumer}")
            consumers[consumer] = {
                k: {x: y for x, y in ci[k].items() if x != "last_active"} for k in ("delivered", "ack_floor")
            }
        keys = ("messages", "bytes", "first_seq", "last_seq", "num_deleted")
        streams[name] = {
            "state": {key: state.get(key) for key in keys},
            "subjects": info["config"].get("subjects"),
            "messages": messages,
            "consumers": consumers,
        }
    return streams


def read(url: str) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        nc = await nats.connect(url)
        try:
            return await dump(nc)
        finally:
            await nc.close()

    return asyncio.run(go())


def change(url: str, *steps: tuple[str, ...]) -> None:
    """("delete", S) | ("empty", S) recreate S empty as before | ("publish", S, subject) | ("purge", S)."""

    async def go() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        for step in steps:
            if step[0] in ("delete", "empty"):
                config = (await api(nc, f"$JS.API.STREAM.INFO.{step[1]}"))["config"]
                await js.delete_stream(step[1])
                if step[0] == "empty":
                    await api(nc, f"$JS.API.STREAM.CREATE.{step[1]}", config)
            elif step[0] == "publish":
                await js.publish(step[2], b"written after the backup")
            elif step[0] == "purge":
                await js.purge_stream(step[1])
        await nc.close()

    asyncio.run(go())


def populate(url: str) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(name=EVENTS, subjects=["bk.events.>"], storage="file")
        for n in range(1, 121):
            headers = {"Nats-Msg-Id": f"event-{n}", "X-Trace": f"trace-{n}"} if n % 3 == 0 else None
            await js.publish(f"bk.events.{n % 4}", f"event {n}".encode(), headers=headers)
        await js.delete_msg(EVENTS, 60)
        await js.add_consumer(EVENTS, durable_name="projector", ack_policy="explicit")
        pull = await js.pull_subscribe_bind("projector", stream=EVENTS)
        for msg in await pull.fetch(7, timeout=5):
            await msg.ack_sync()
        await pull.unsubscribe()
        await js.add_stream(name=OTHER, subjects=["bk.other.>"], storage="file")
        for n in range(10):
            await js.publish("bk.other.x", f"other {n}".encode())
        await js.add_stream(name=EMPTY, subjects=["bk.empty.>"], storage="file")
        await nc.close()

    asyncio.run(go())


def sets(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "backups" / CLUSTER).iterdir())


@pytest.fixture
def live(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "server").mkdir()
    with local_jetstream(tmp_path / "server") as url:
        populate(url)
        yield url


def take_backup(tmp_path: Path, url: str, *args: str) -> Path:
    result = play(tmp_path, url, BACKUP, *args)
    assert result.returncode == 0, result.stdout[-4000:]
    found = re.search(r"Backup set (\S+):", result.stdout)
    assert found, result.stdout[-3000:]
    return Path(found.group(1))


def saved_set(tmp_path: Path, url: str) -> Path:
    """A backup set as the role writes it, taken with the module's own code (no playbook run)."""
    path = tmp_path / "backups" / CLUSTER / "20260101T000000Z"
    params = {"path": str(path), "timeout": 5.0, "force": False, "streams": [], "include_consumers": True}

    async def go() -> None:
        nc = await nats.connect(url)
        try:
            await load_plugin_module("jetstream_snapshot").save(nc, params, False)
        finally:
            await nc.close()

    asyncio.run(go())
    return path


def fake_set(directory: Path, name: str, complete: bool = True) -> None:
    (directory / name).mkdir(parents=True)
    if complete:
        (directory / name / "manifest.json").write_text(json.dumps({"format": 1, "streams": []}))


def test_each_run_writes_a_new_set_and_keeps_only_the_newest(tmp_path: Path, live: str) -> None:
    cluster_dir = tmp_path / "backups" / CLUSTER
    for name in ("20200101T000000Z", "20200102T000000Z"):
        fake_set(cluster_dir, name)
    # Not sets: an unfinished one of each kind, a file, a directory, a link to a complete set.
    fake_set(cluster_dir, "20200103T000000Z", complete=False)
    fake_set(cluster_dir, ".20200104T000000Z.partial", complete=False)
    (cluster_dir / "notes.txt").write_text("kept")
    (cluster_dir / "before-restore-20200105T000000Z").mkdir()
    fake_set(tmp_path / "elsewhere", "20200106T000000Z")
    (cluster_dir / "20200107T000000Z").symlink_to(tmp_path / "elsewhere" / "20200106T000000Z")
    others = {"20200103T000000Z", ".20200104T000000Z.partial", "notes.txt", "before-restore-20200105T000000Z"}

    started = time.monotonic()
    result = play(tmp_path, live, BACKUP, "-e", "jetstream_backup_keep=2")
    first_seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:]
    found = re.search(r"Backup set (\S+):", result.stdout)
    assert found, result.stdout[-3000:]
    first = Path(found.group(1))
    assert first.parent == cluster_dir and re.fullmatch(r"\d{8}T\d{6}Z", first.name)
    assert set(sets(tmp_path)) == {first.name, "20200102T000000Z", "20200107T000000Z", *others}
    output = flat(result)
    # Each stream's messages, bytes and time.
    assert re.search(
        rf"{EVENTS}: 119 messages \(seq 1-120\), [\d.]+ KiB stored, archive [\d.]+ \S+, 1 consumers, [\d.]+ s", output
    )
    assert f"{EMPTY}: 0 messages" in output and "Total: 3 streams, 129 messages" in output
    assert "removed 20200101T000000Z" in output and "Incomplete, left alone" in output

    manifest = json.loads((first / "manifest.json").read_text())
    for entry in manifest["streams"]:
        assert entry["sha256"] == load_plugin_module("jetstream_snapshot").sha256_of(first / entry["snapshot_file"])
        assert entry["seconds"] >= 0

    time.sleep(max(0.0, 1.1 - first_seconds))  # stamps are to the second
    second = take_backup(tmp_path, live, "-e", "jetstream_backup_keep=2")
    assert second != first
    assert set(sets(tmp_path)) == {first.name, second.name, "20200107T000000Z", *others}
    assert (tmp_path / "elsewhere" / "20200106T000000Z" / "manifest.json").exists(), "followed a link"


def test_a_failed_backup_leaves_no_set_behind(tmp_path: Path) -> None:
    fake_set(tmp_path / "backups" / CLUSTER, "20200101T000000Z")
    result = play(tmp_path, f"nats://127.0.0.1:{free_port()}", BACKUP, jetstream_backup_timeout=1)
    assert result.returncode != 0
    output = flat(result)
    assert "Backup failed: cannot connect to" in output and "No set was written" in output, output[-3000:]
    assert sets(tmp_path) == ["20200101T000000Z"]


def test_the_backup_dir_is_refused_on_the_share_before_the_cluster_is_contacted(tmp_path: Path) -> None:
    # No server at all: a refusal that regressed would fail later, on connecting, instead.
    url = f"nats://127.0.0.1:{free_port()}"
    result = play(tmp_path, url, BACKUP, jetstream_backup_dir="/mnt/cimstor-jetstream/backups")
    assert result.returncode != 0
    assert "is on the JetStream storage (/mnt/cimstor-jetstream)" in flat(result), flat(result)[-2000:]
    assert "Backup | start the set" not in result.stdout
    assert not (tmp_path / "backups").exists()


def test_publish_and_prune_rules(tmp_path: Path) -> None:
    module = load_plugin_module("jetstream_backup_sets")
    assert module.SET_NAME.fullmatch("20261201T030000Z") and not module.SET_NAME.fullmatch("latest")
    cluster_dir = tmp_path / "sets"
    module.start(cluster_dir, "20260101T000000Z", False)
    with pytest.raises(module.SetError, match="exists already"):
        module.start(cluster_dir, "20260101T000000Z", False)
    with pytest.raises(module.SetError, match=r"holds no manifest\.json: the save did not finish"):
        module.publish(cluster_dir, "20260101T000000Z", False)
    assert module.survey(cluster_dir) == ([], [".20260101T000000Z.partial"])
    (cluster_dir / ".20260101T000000Z.partial" / "manifest.json").write_text(json.dumps({"format": 1, "streams": []}))
    module.publish(cluster_dir, "20260101T000000Z", False)
    assert module.survey(cluster_dir) == (["20260101T000000Z"], [])
    with pytest.raises(module.SetError, match="the newest set is always kept"):
        module.prune(cluster_dir, 0, None, False)
    # A set written with a clock behind the others is still kept, and counts towards keep.
    for name in ("20270101T000000Z", "20270102T000000Z", "20270103T000000Z"):
        fake_set(cluster_dir, name)
    (cluster_dir / "20270104T000000Z").mkdir()
    (cluster_dir / "20270104T000000Z" / "manifest.json").write_text("{not json")
    checked = module.prune(cluster_dir, 2, "20260101T000000Z", True)
    assert checked["kept"] == ["20270103T000000Z", "20260101T000000Z"] and len(list(cluster_dir.iterdir())) == 5
    result = module.prune(cluster_dir, 2, "20260101T000000Z", False)
    assert result["removed"] == ["20270102T000000Z", "20270101T000000Z"]
    assert sorted(p.name for p in cluster_dir.iterdir()) == ["20260101T000000Z", "20270103T000000Z", "20270104T000000Z"]


def test_backup_dir_rules(tmp_path: Path) -> None:
    problems = load_filter_plugin("jetstream_backup").backup_dir_problems
    share = {
        "jetstream_storage_mount_path": "/mnt/cimstor-jetstream",
        "jetstream_storage_mount_source": "nfs1:/export/js",
    }

    def check(backup_dir: str, keep: Any = 3, mounts: str = "") -> list[str]:
        return list(problems(share | {"jetstream_backup_dir": backup_dir, "jetstream_backup_keep": keep}, mounts))

    assert check("/var/backups/nats-jetstream") == []
    assert check("/var/backups/nats-jetstream", keep="7") == [], "-e passes numbers as text"
    assert check("/mnt/cimstor-jetstream-backups") == [], "a sibling of the mount is not on it"
    assert "is on the JetStream storage" in check("/mnt/cimstor-jetstream/nats-1/backups")[0]
    assert "must be written plainly" in check("/var/backups/../../mnt/cimstor-jetstream")[0]
    assert "whole number of at least 1" in check("/var/backups/x", keep=0)[0]
    assert "whole number of at least 1" in check("/var/backups/x", keep=True)[0]
    mounts = "/dev/sda1 / ext4 rw 0 0\nnfs1:/export/js /srv/js-share nfs4 rw 0 0\n"
    assert (
        "is on nfs1:/export/js (mounted at /srv/js-share here), the JetStream share itself"
        in check("/srv/js-share/backups", mounts=mounts)[0]
    )
    assert check("/var/backups/x", mounts=mounts) == []
    # A link into the share is followed on the controller.
    link = tmp_path / "link"
    link.symlink_to("/mnt/cimstor-jetstream")
    assert "really /mnt/cimstor-jetstream/x" in check(f"{link}/x")[0]


def test_restore_fills_missing_and_empty_streams_and_leaves_what_matches(tmp_path: Path, live: str) -> None:
    before = read(live)
    backup = saved_set(tmp_path, live)
    # EVENTS is gone; OTHER was recreated empty (as a redeploy does); EMPTY is still as saved.
    change(live, ("delete", EVENTS), ("empty", OTHER))
    result = play(tmp_path, live, RESTORE, "-e", f"jetstream_backup_set={backup}")
    assert result.returncode == 0, result.stdout[-4000:]
    output = flat(result)
    assert re.search(rf"{EVENTS}: 119 messages \(seq 1-120\).*, was missing: restored, [\d.]+ s", output), output[
        -3000:
    ]
    assert re.search(rf"{OTHER}: 10 messages .*, was empty: replaced, [\d.]+ s", output), output[-3000:]
    assert f"{EMPTY}: left alone, already holds the messages of the backup (0 messages, last seq 0)" in output
    assert read(live) == before
    assert not [p for p in (tmp_path / "backups" / CLUSTER).iterdir() if p.name.startswith("before-restore")]


def test_restore_refuses_streams_holding_data_and_restores_nothing(tmp_path: Path, live: str) -> None:
    backup = saved_set(tmp_path, live)
    # EVENTS missing (restorable), OTHER holds a message the backup lacks, EMPTY was purged after a
    # write: 0 messages but last seq 1, so it is not empty (it held data).
    change(
        live, ("delete", EVENTS), ("publish", OTHER, "bk.other.x"), ("publish", EMPTY, "bk.empty.x"), ("purge", EMPTY)
    )
    changed = read(live)
    result = play(tmp_path, live, RESTORE, "-e", f"jetstream_backup_set={backup}")
    assert result.returncode != 0
    output = flat(result)
    assert "Restore refused, nothing was restored: Refusing to restore anything: stream(s) hold data" in output
    assert f"{OTHER} (11 messages, seq 1-11; the backup has 10 messages, seq 1-10)" in output, output[-3000:]
    assert f"{EMPTY} (0 messages, last seq 1; the backup has 0 messages, last seq 0)" in output
    assert EVENTS not in output.split("Refusing to restore anything")[1].split("Name them")[0]
    assert "-e jetstream_restore_overwrite=STREAM[,STREAM]" in output
    assert read(live) == changed, "something was restored"


def test_an_overwrite_must_be_named_and_confirmed_and_saves_the_stream_first(tmp_path: Path, live: str) -> None:
    before = read(live)
    backup = saved_set(tmp_path, live)
    change(live, ("publish", OTHER, "bk.other.late"))
    changed = read(live)
    args = ("-e", f"jetstream_backup_set={backup}", "-e", f"jetstream_restore_overwrite=[{OTHER}]")

    result = play(tmp_path, live, RESTORE, *args, "-e", f"jetstream_restore_confirm={EVENTS}")
    assert result.returncode != 0
    assert f"Confirmation did not match '{OTHER}': nothing was restored" in flat(result), flat(result)[-2000:]
    assert read(live) == changed

    result = play(tmp_path, live, RESTORE, *args, "-e", f"jetstream_restore_confirm={OTHER}")
    assert result.returncode == 0, result.stdout[-4000:]
    assert re.search(rf"{OTHER}: 10 messages .*, held other data: overwritten, [\d.]+ s", flat(result)), flat(result)[
        -3000:
    ]
    assert read(live) == before
    saved = [p for p in (tmp_path / "backups" / CLUSTER).iterdir() if p.name.startswith("before-restore-")]
    assert len(saved) == 1
    manifest = json.loads((saved[0] / "manifest.json").read_text())
    assert [(s["name"], s["messages"], s["last_seq"]) for s in manifest["streams"]] == [(OTHER, 11, 11)]
    assert "Overwritten streams saved first to" in flat(result)


def release_dir(tmp_path: Path) -> Path:
    """The pinned release laid out as nats_server_controller_release_dir wants it (the wheel's
    nats-server in the official archive's layout, and SHA256SUMS)."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]
    name = f"nats-server-v{NATS_SERVER_VERSION}-linux-{arch}"
    releases = tmp_path / "releases"
    (releases / f"v{NATS_SERVER_VERSION}" / name).mkdir(parents=True)
    shutil.copy(NATS_SERVER, releases / f"v{NATS_SERVER_VERSION}" / name / "nats-server")
    archive = releases / f"v{NATS_SERVER_VERSION}" / f"{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(releases / f"v{NATS_SERVER_VERSION}" / name, arcname=name)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    (releases / f"v{NATS_SERVER_VERSION}" / "SHA256SUMS").write_text(f"{digest}  {archive.name}\n")
    return releases


def test_the_drill_restores_into_a_scratch_server_and_leaves_the_live_one_alone(tmp_path: Path, live: str) -> None:
    """With the release fetched (and checked against its SHA256SUMS) as the deploy fetches it."""
    backup = saved_set(tmp_path, live)
    change(live, ("publish", OTHER, "bk.other.late"))  # the live server no longer equals the set
    before = read(live)
    releases = release_dir(tmp_path)
    result = play(
        tmp_path,
        live,
        RESTORE,
        "-e",
        f"jetstream_backup_set={backup}",
        "-e",
        "jetstream_restore_drill=true",
        nats_server_version=NATS_SERVER_VERSION,
        nats_server_artifact_source="controller",
        nats_server_controller_release_dir=str(releases),
    )
    assert result.returncode == 0, result.stdout[-4000:]
    output = flat(result)
    assert "saved from nats-server 2.15.1, restored into 2.15.1" in output, output[-3000:]
    assert re.search(rf"{EVENTS}: 119 messages \(seq 1-120\).*1 consumers restored", output), output[-3000:]
    assert "Every stream restored and matches the manifest" in output and "The cluster was not contacted" in output
    assert read(live) == before
    assert not [p for p in (tmp_path / "backups").iterdir() if p.name.startswith(".restore-drill-")]
    assert (tmp_path / "backups" / ".nats-server" / f"v{NATS_SERVER_VERSION}" / "nats-server").is_file()

    # A tampered set fails the drill before any server starts.
    snapshot = backup / f"{OTHER}.snapshot"
    snapshot.write_bytes(snapshot.read_bytes() + b"x")
    drill: dict[str, Any] = {
        "path": str(backup),
        "streams": [],
        "server_binary": "/nonexistent",
        "work_dir": None,
        "timeout": 5.0,
    }
    module = load_plugin_module("jetstream_snapshot")
    with pytest.raises(module.SnapshotError, match=f"Refusing to restore anything: {re.escape(str(snapshot))} has"):
        asyncio.run(module.drill(drill, False))


def test_an_empty_stream_that_gets_a_message_is_not_replaced(tmp_path: Path, live: str) -> None:
    """The fence: a stream found empty is checked again after its subjects are moved away; one
    that took a message in between keeps it and gets its subjects back."""
    snapshot = load_plugin_module("jetstream_snapshot")
    change(live, ("publish", EMPTY, "bk.empty.x"))

    async def go() -> str:
        nc = await nats.connect(live)
        info = await api(nc, f"$JS.API.STREAM.INFO.{EMPTY}")
        stale = info | {"state": info["state"] | {"messages": 0, "last_seq": 0}}  # what the plan saw
        try:
            await snapshot.delete_empty(nc, EMPTY, stale, 5.0)
        except snapshot.SnapshotError as error:
            return str(error)
        finally:
            await nc.close()
        raise AssertionError("a stream holding a message was deleted")

    message = asyncio.run(go())
    assert (
        message == f"{EMPTY}: was empty when checked, but now holds 1 messages, seq 1-1; not replaced, it is as it was"
    )
    after = read(live)[EMPTY]
    assert after["subjects"] == ["bk.empty.>"] and after["state"]["messages"] == 1


def test_an_r3_set_drills_on_a_single_scratch_server(tmp_path: Path) -> None:
    """A single server refuses num_replicas above 1 (10074) and reads the config from the restore
    request: the drill asks for one replica. A consumer saved with num_replicas 3 cannot be held by
    one server (10126): the drill fails and says why."""
    snapshot = load_plugin_module("jetstream_snapshot")
    with local_trio(tmp_path / "cluster") as servers:
        urls = [server.client_url for server in servers]

        async def save() -> None:
            deadline = time.monotonic() + 30
            while True:
                try:
                    nc = await nats.connect(urls, connect_timeout=1)
                    js = nc.jetstream(timeout=5)
                    await js.add_stream(name="R3", subjects=["r3.>"], num_replicas=3)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.3)
            for n in range(50):
                await js.publish(f"r3.{n % 3}", f"event {n}".encode(), headers={"N": str(n)})
            await js.add_consumer("R3", durable_name="inherits", ack_policy="explicit")
            params = {"path": str(tmp_path / "r3"), "timeout": 5.0, "force": False, "streams": []}
            await snapshot.save(nc, params | {"include_consumers": True}, False)
            await js.add_consumer("R3", durable_name="three", ack_policy="explicit", num_replicas=3)
            await snapshot.save(nc, params | {"path": str(tmp_path / "r3-explicit"), "include_consumers": True}, False)
            await nc.close()

        asyncio.run(save())
    assert json.loads((tmp_path / "r3" / "R3.json").read_text())["config"]["num_replicas"] == 3

    drill = {"streams": [], "server_binary": str(NATS_SERVER), "work_dir": str(tmp_path), "timeout": 5.0}
    result = asyncio.run(snapshot.drill(drill | {"path": str(tmp_path / "r3")}, False))
    assert [(s["name"], s["messages"], s["restored_consumers"]) for s in result["streams"]] == [("R3", 50, 1)]
    with pytest.raises(snapshot.SnapshotError, match=r"10126.*num_replicas above 1 cannot live on a single scratch"):
        asyncio.run(snapshot.drill(drill | {"path": str(tmp_path / "r3-explicit")}, False))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".restore-drill-")] == []


# Each node has room for one stream of BIG bytes (x3 replicas over the three nodes), not two.
SMALL_STORE, BIG, LITTLE = 1024**3, 700 * 1024**2, 100 * 1024**2


async def until_no_room(nc: Any) -> None:
    """Returns once the meta leader itself refuses a BIG R3 stream for want of room (10005): the
    storage the servers last reported has caught up with the streams that hold it."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        probe = {"name": "PROBE", "subjects": ["probe.>"], "num_replicas": 3, "max_bytes": BIG}
        reply = await api(nc, "$JS.API.STREAM.CREATE.PROBE", probe)
        if (reply.get("error") or {}).get("err_code") == 10005:
            return
        if not reply.get("error"):
            await api(nc, "$JS.API.STREAM.DELETE.PROBE")
        await asyncio.sleep(0.5)
    raise AssertionError("the cluster kept finding room for a stream it has no room for")


def test_a_restore_waits_for_room_the_cluster_is_freeing(tmp_path: Path) -> None:
    """The meta leader places a stream from the storage the servers last reported, so right after a
    stream is deleted (an empty one replaced by its backup, on the lab) its room still looks taken:
    the restore is asked again until it fits, here once another stream is deleted 2 s in."""
    snapshot = load_plugin_module("jetstream_snapshot")
    params = {"path": str(tmp_path / "set"), "timeout": 5.0, "force": False, "streams": ["WANTED"]}
    restore = params | {"existing": "fill", "overwrite": [], "include_consumers": False}
    with local_trio(tmp_path / "cluster", f"max_file_store: {SMALL_STORE}") as servers:

        async def go() -> tuple[dict[str, Any], dict[str, Any], float]:
            nc = await nats.connect([server.client_url for server in servers])
            js = nc.jetstream(timeout=5)
            await js.add_stream(name="WANTED", subjects=["wanted.>"], num_replicas=3, max_bytes=BIG)
            for n in range(20):
                await js.publish(f"wanted.{n % 2}", f"event {n}".encode())
            await snapshot.save(nc, params | {"include_consumers": False}, False)
            await js.delete_stream("WANTED")
            # Placed as the module places: the deleted WANTED's room may still look taken.
            room = {"name": "ROOM", "subjects": ["room.>"], "num_replicas": 3, "max_bytes": BIG}
            await snapshot.placed(nc, "$JS.API.STREAM.CREATE.ROOM", room, 5.0)
            await until_no_room(nc)

            async def free_the_room() -> None:
                await asyncio.sleep(2)
                await js.delete_stream("ROOM")

            started = time.monotonic()
            freeing = asyncio.create_task(free_the_room())
            result = await snapshot.restore(nc, restore, False)
            waited = time.monotonic() - started
            await freeing
            info = await api(nc, "$JS.API.STREAM.INFO.WANTED")
            await nc.close()
            return result, info, waited

        result, info, waited = asyncio.run(go())
    assert [(s["name"], s["action"]) for s in result["streams"]] == [("WANTED", "restored")]
    assert (info["state"]["messages"], info["config"]["num_replicas"]) == (20, 3)
    assert waited >= 2, waited


def test_an_empty_stream_whose_restore_fails_is_put_back_as_it_was(tmp_path: Path) -> None:
    """The backup's stream cannot be placed at all (another stream holds the room): after the wait
    the restore fails, naming the stream, and the empty stream it deleted is there again, as it was,
    so its writers still have a stream."""
    snapshot = load_plugin_module("jetstream_snapshot")
    params = {"path": str(tmp_path / "set"), "timeout": 5.0, "force": False, "streams": ["WANTED"]}
    restore = params | {"existing": "fill", "overwrite": [], "include_consumers": False}
    with local_trio(tmp_path / "cluster", f"max_file_store: {SMALL_STORE}") as servers:

        async def create(nc: Any, name: str, max_bytes: int) -> None:
            # Placed as the module places, waiting while the deleted WANTED's room is still reserved.
            config = {"name": name, "subjects": [f"{name.lower()}.>"], "num_replicas": 3, "max_bytes": max_bytes}
            await snapshot.placed(nc, f"$JS.API.STREAM.CREATE.{name}", config, 5.0)

        async def go() -> tuple[str, dict[str, Any]]:
            nc = await nats.connect([server.client_url for server in servers])
            js = nc.jetstream(timeout=5)
            await create(nc, "WANTED", BIG)
            await js.publish("wanted.x", b"saved")
            await snapshot.save(nc, params | {"include_consumers": False}, False)
            await js.delete_stream("WANTED")
            await create(nc, "WANTED", LITTLE)
            await create(nc, "ROOM", BIG)
            snapshot.PLACEMENT_WAIT = 2.0  # the restore itself gives up soon: ROOM keeps the room
            try:
                await snapshot.restore(nc, restore, False)
            except snapshot.SnapshotError as error:
                message = str(error)
            else:
                raise AssertionError("a stream that cannot be placed was restored")
            info = await api(nc, "$JS.API.STREAM.INFO.WANTED")
            await nc.close()
            return message, info

        message, info = asyncio.run(go())
    # Refused at once (10005), or accepted on a stale view of the room and failed at its end (10047).
    assert "WANTED" in message.split(";")[0] and "insufficient storage" in message, message
    assert message.endswith("; WANTED was created again as it was (empty)"), message
    assert (info["config"]["max_bytes"], info["config"]["subjects"], info["state"]["messages"]) == (
        LITTLE,
        ["wanted.>"],
        0,
    )
