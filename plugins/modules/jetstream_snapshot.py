#!/usr/bin/python
"""Ansible module: save JetStream streams to controller files with the server's native snapshot API,
and restore them from those files."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: jetstream_snapshot
short_description: Save and restore JetStream streams with the server's snapshot/restore API
description:
  - Uses the API behind C(nats stream backup) and C(nats stream restore)
    (C($JS.API.STREAM.SNAPSHOT.<stream>) and C($JS.API.STREAM.RESTORE.<stream>)), so sequence
    numbers, gaps, timestamps, headers and (optionally) consumer state come back exactly.
  - I(state=saved) writes, for each stream, C(<STREAM>.snapshot) (the bytes exactly as the server
    sends them, an S2-compressed archive), C(<STREAM>.json) (stream config and state at snapshot
    time, as the server returned them) and finally C(manifest.json) (streams, byte sizes, sha256 of
    every file, message counts, first/last sequence, a UTC timestamp and the server version).
  - I(state=restored) reads the manifest, checks the size and sha256 of every selected file and,
    with I(existing=fail), that none of the streams exists, before anything is sent; a bad file or
    an existing stream fails naming it and nothing is restored. After each restore the stream's
    messages, first and last sequence are compared with the manifest and any difference fails, with
    one exception, reported as C(aged_out) - fewer messages at the head when the stream's own
    max_age (or message TTLs) removed them between save and restore; the last sequence must match.
  - A restore the server rejects part way leaves a partial stream behind; the module deletes that
    stream (it did not exist before) and fails, so a second run can start clean.
  - With I(existing=fill) (the restore runbook's mode) a stream that exists is left alone when it
    already holds exactly the backup's messages (same count, first and last sequence), and replaced
    when it is empty, that is when it holds no message and never held one (0 messages and last
    sequence 0, what a deploy that recreated a declared stream leaves). Before an empty stream is
    deleted its subjects are moved to C(_restore_fence.<stream>), so no publish can land in it and
    be lost with it; it is checked again, and put back as it was if a message got in. Any other
    existing stream fails the restore before anything is sent, unless it is named in I(overwrite).
  - I(state=drilled) proves a backup restores without touching any live server - it starts a
    scratch nats-server (I(server_binary)) on 127.0.0.1 with JetStream in a temporary directory,
    restores every selected stream there, compares each with the manifest as a restore does, stops
    the server and removes the directory. A single server cannot hold replicas, so every stream is
    restored with num_replicas 1 and no placement (the server refuses num_replicas above 1 outside
    a cluster, error 10074, and reads the stream config from the restore request, not from the
    archive). A consumer saved with an explicit num_replicas above 1 cannot be restored into it
    (error 10126); the drill then fails for that stream and says so.
  - Snapshot archives from nats-server 2.15 use a new format that older servers cannot restore.
extends_documentation_fragment:
  - jetstream_connection
options:
  servers:
    description:
      - Client URLs of the cluster (tls://host:port, or nats:// without TLS).
      - Required for C(saved) and C(restored); C(drilled) connects to no server but its own scratch
        one, and refuses this option.
    type: list
    elements: str
    required: false
  state:
    description: C(saved) writes snapshots to I(path); C(restored) restores them from I(path);
      C(drilled) restores them into a scratch server and compares them with the manifest.
    type: str
    choices: [saved, restored, drilled]
    required: true
  path:
    description: Directory on the controller holding the snapshot files and C(manifest.json).
    type: path
    required: true
  streams:
    description:
      - Streams to save or restore. Empty means every stream in the account (saved) or every stream
        in the manifest (restored). A name that does not exist there fails before anything is done.
    type: list
    elements: str
    default: []
  include_consumers:
    description:
      - saved, include consumer configs and state in the snapshots. restored, when false, delete
        the consumers a snapshot brought back, so only the stream data is restored.
    type: bool
    default: true
  existing:
    description:
      - restored, what to do with a stream that already exists, C(fail) before any restore begins,
        C(skip) it, or C(fill) - leave it when it already holds the backup's messages, replace it
        when it is empty (0 messages, last sequence 0), fail before any restore begins otherwise.
      - A stream named in I(overwrite) is replaced whatever this says.
    type: str
    choices: [fail, skip, fill]
    default: fail
  overwrite:
    description:
      - restored, streams of the backup that may be deleted and restored although they exist and
        hold data. Their current messages are lost unless saved first (the restore runbook saves
        them). A name that is not in the backup fails before anything is done.
    type: list
    elements: str
    default: []
  server_binary:
    description: drilled, the nats-server executable for the scratch server (the release the
      cluster runs).
    type: path
  work_dir:
    description: drilled, where the scratch server's temporary directory is made (it needs room
      for the restored streams); the system's temporary directory when empty.
    type: path
  force:
    description: saved, replace a backup already in I(path). Without it a C(manifest.json) in
      I(path) is refused, so a rerun after a wipe cannot overwrite the good backup.
    type: bool
    default: false
  timeout:
    description:
      - Seconds for connecting and for each API call. Transfers have no total limit; they fail when
        no chunk moves for max(30, 6 x timeout) seconds. The server's final answer to a restore may
        take up to 600 seconds.
    type: float
    default: 5.0
notes:
  - Supports check mode, saved writes nothing and restored changes nothing; both report the streams
    they would act on (restored also checks the files and existing streams, and names the action
    for each stream). drilled in check mode checks the files only.
  - An existing stream a restore replaces is deleted first; if its restore then fails, the stream
    is missing, and running the restore again fills it.
requirements:
  - nats-py on the controller
author: cim-nats-infra
"""

EXAMPLES = r"""
- name: Reset | snapshot every stream while the cluster still answers
  jetstream_snapshot:
    servers: "{{ jetstream_streams_servers }}"
    user: "{{ jetstream_streams_user }}"
    password: "{{ jetstream_streams_password }}"
    tls_ca_file: "{{ jetstream_streams_tls_ca_file }}"
    state: saved
    path: "/var/backups/nats/{{ reset_id }}"
  delegate_to: localhost
  run_once: true

- name: Reset | restore every stream into the wiped cluster
  jetstream_snapshot:
    servers: "{{ jetstream_streams_servers }}"
    user: "{{ jetstream_streams_user }}"
    password: "{{ jetstream_streams_password }}"
    tls_ca_file: "{{ jetstream_streams_tls_ca_file }}"
    state: restored
    path: "/var/backups/nats/{{ reset_id }}"
  delegate_to: localhost
  run_once: true
"""

RETURN = r"""
streams:
  description:
    - Streams saved, restored or drilled (in check mode, that would be). Each has name, messages,
      bytes, first_seq, last_seq, consumers, snapshot_bytes and sha256 (the last two null for saved
      in check mode), as saved in the manifest, and seconds (the time it took; null in check mode).
      Restored and drilled streams add aged_out, the messages their max_age or TTLs removed since
      the save. Restored streams add action - restored (it was missing), replaced_empty or
      overwritten. Drilled streams add restored_consumers, the consumers the scratch server holds.
  type: list
  elements: dict
  returned: always
skipped_streams:
  description: restored, the streams that existed and were left alone (existing=skip, or
    existing=fill and already holding the backup's messages).
  type: list
  elements: str
  returned: when state is restored
skip_reasons:
  description: restored, why each of skipped_streams was left alone.
  type: dict
  returned: when state is restored
drill_server_version:
  description: drilled, the version of the scratch nats-server.
  type: str
  returned: when state is drilled and not in check mode
server_version:
  description: restored and drilled, the server version the backup was saved from (its manifest).
  type: str
  returned: when state is restored or drilled
path:
  description: The directory used.
  type: str
  returned: always
"""

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.jetstream_api import (
    CONNECTION_ARGUMENT_SPEC,
    JS_API,
    STREAM_NOT_FOUND,
    ApiError,
    ConnectError,
    NoAnswer,
    NoResponders,
    api,
    connect,
    paged,
    request,
    stream_info,
)
from ansible.module_utils.jetstream_backup_files import fsync_dir

try:
    import nats

    HAS_NATS = True
except ImportError:  # reported by fail_json below
    HAS_NATS = False

API = JS_API
MANIFEST = "manifest.json"
FORMAT = 1
# jsm.go sends restore data in 64-512 KiB requests; 128 KiB matches the server's snapshot chunk.
RESTORE_CHUNK = 128 * 1024
# The server answers the final empty restore chunk only when the stream is stored and activated.
FINAL_WAIT = 600.0
# In a cluster the restore's answer (sent through the system account) can reach the client before
# the stream leader's subscription to the deliver subject has crossed the account's own route, so
# the first chunk may find no responder (seen about once in 16 cluster resets on the lab). Nobody
# received it, so it is sent again for up to this long; the server gives a restore up after 5 s
# without a chunk.
UNHEARD_CHUNK_RETRY = 3.0
SUMMARY_KEYS = ("messages", "bytes", "first_seq", "last_seq")
# "no suitable peers for placement": the meta leader places a stream from the storage each server
# last reported, so right after a stream is deleted its reservation still counts for a while (on
# the lab a 10 GiB R3 stream replaced by its own backup was refused at once). The restore is asked
# again for up to this long before the refusal stands.
NO_SUITABLE_PEERS = 10005
PLACEMENT_WAIT = 30.0
# The delete of what a failed restore left can go unanswered while the server tears the stream
# down (see delete_partial); it is sent again for up to this long.
PARTIAL_DELETE_WAIT = 30.0

# Protocol, as nats-server 2.15 implements it (server/jetstream_api.go: JSApiStreamSnapshotRequest,
# streamSnapshot, jsStreamRestoreRequest, processStreamRestore) and jsm.go snapshots.go uses it:
# - Snapshot: subscribe to a deliver subject first (the server waits only ~2 s for interest), then
#   request {"deliver_subject", "no_consumers"}; the reply carries config and state. Chunks arrive
#   with a reply subject $JS.SNAPSHOT.ACK.<stream>.<id>.<size>.<index>; answering it (empty body)
#   frees a flow-control slot, and the server gives up after 5 s without acks (408 No Flow
#   Response). The end is an empty message: no header, or status 204, on success; 408 or 500 with
#   a description on failure. A snapshot smaller than one chunk ends with no header at all.
# - Restore: request {"config", "state"}; the reply names a deliver subject. Each chunk is a request
#   answered with an empty body (or a JSON error); the server stalls the restore after 5 s without
#   a chunk. An empty request ends the upload and is answered with a stream_create_response.


class SnapshotError(Exception):
    """A failure to report; `restored` lists the streams restored before it."""

    def __init__(self, msg: str, restored: list[dict[str, Any]] | None = None) -> None:
        super().__init__(msg)
        self.restored = restored or []


def idle_limit(timeout: float) -> float:
    return max(30.0, 6 * timeout)


async def stream_names(nc: Any, timeout: float) -> list[str]:
    names, _ = await paged(nc, f"{API}.STREAM.NAMES", "streams", timeout)
    return sorted(names)


def summary(name: str, state: dict[str, Any], **extra: Any) -> dict[str, Any]:
    found = {key: int(state.get(key) or 0) for key in SUMMARY_KEYS}
    return {"name": name, **found, "consumers": int(state.get("consumer_count") or 0), **extra}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path: Path, data: bytes) -> None:
    part = path.with_name(path.name + ".part")
    with part.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    part.replace(path)


async def snapshot_to_file(
    nc: Any, name: str, target: Path, include_consumers: bool, timeout: float
) -> tuple[dict[str, Any], int, str]:
    """Streams one snapshot into `target`; returns the server's config+state, size and sha256."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    part = target.with_name(target.name + ".part")
    try:
        ask = {"deliver_subject": inbox, "no_consumers": not include_consumers}
        meta = await api(nc, f"{API}.STREAM.SNAPSHOT.{name}", ask, timeout)
        digest, size, idle = hashlib.sha256(), 0, idle_limit(timeout)
        with part.open("wb") as out:
            while True:
                try:
                    msg = await sub.next_msg(timeout=idle)
                except nats.errors.TimeoutError:
                    raise SnapshotError(
                        f"{name}: snapshot stalled, no data for {idle:.0f} s after {size} bytes"
                    ) from None
                if not msg.data:
                    headers = msg.headers or {}
                    status = headers.get("Status")
                    if status not in (None, "204"):
                        why = headers.get("Description", "")
                        raise SnapshotError(f"{name}: the server ended the snapshot with {status} {why}".rstrip())
                    break
                out.write(msg.data)
                digest.update(msg.data)
                size += len(msg.data)
                if msg.reply:
                    await nc.publish(msg.reply, b"")
            out.flush()
            os.fsync(out.fileno())
        part.replace(target)
        return {"config": meta.get("config"), "state": meta.get("state")}, size, digest.hexdigest()
    finally:
        with contextlib.suppress(nats.errors.Error):  # keep the real error if the connection is gone
            await sub.unsubscribe()
        part.unlink(missing_ok=True)


async def save(nc: Any, params: dict[str, Any], check_mode: bool) -> dict[str, Any]:
    path = Path(params["path"])
    timeout = params["timeout"]
    manifest_path = path / MANIFEST
    if manifest_path.exists() and not params["force"]:
        raise SnapshotError(f"{manifest_path} already holds a backup; use a new directory, or force=true to replace it")
    names = list(dict.fromkeys(params["streams"])) or await stream_names(nc, timeout)
    infos = {name: await stream_info(nc, name, timeout) for name in names}
    missing = [name for name, info in infos.items() if info is None]
    if missing:
        raise SnapshotError(f"No such stream(s) to save: {', '.join(missing)}")
    if check_mode:
        planned = []
        for name in names:
            entry = summary(
                name, (infos[name] or {}).get("state") or {}, snapshot_bytes=None, sha256=None, seconds=None
            )
            if not params["include_consumers"]:
                entry["consumers"] = 0
            planned.append(entry)
        return {"changed": True, "path": str(path), "streams": planned}

    path.mkdir(parents=True, exist_ok=True)
    # A half-done save must never leave a manifest that points at a mix of old and new files.
    manifest_path.unlink(missing_ok=True)
    entries = []
    for name in names:
        snapshot_file, meta_file = path / f"{name}.snapshot", path / f"{name}.json"
        started = time.monotonic()
        try:
            meta, size, sha256 = await snapshot_to_file(nc, name, snapshot_file, params["include_consumers"], timeout)
        except (SnapshotError, ApiError) as error:
            raise SnapshotError(f"{error}; no {MANIFEST} written, the backup in {path} is incomplete") from None
        except (nats.errors.Error, TimeoutError) as error:
            raise SnapshotError(
                f"{name}: {type(error).__name__}: {error}; no {MANIFEST} written, the backup in {path} is incomplete"
            ) from None
        meta_bytes = json.dumps(meta, indent=2, sort_keys=True).encode() + b"\n"
        write_atomically(meta_file, meta_bytes)
        state = meta.get("state") or {}
        entry = summary(name, state, snapshot_bytes=size, sha256=sha256)
        if not params["include_consumers"]:
            entry["consumers"] = 0
        entry |= {
            "snapshot_file": snapshot_file.name,
            "meta_file": meta_file.name,
            "meta_sha256": hashlib.sha256(meta_bytes).hexdigest(),
            "seconds": round(time.monotonic() - started, 3),
        }
        entries.append(entry)
    version = nc.connected_server_version
    manifest = {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "server_version": f"{version.major}.{version.minor}.{version.patch}",
        "include_consumers": params["include_consumers"],
        "streams": entries,
    }
    write_atomically(manifest_path, json.dumps(manifest, indent=2).encode() + b"\n")
    fsync_dir(path)
    return {"changed": True, "path": str(path), "streams": [public(entry) for entry in entries]}


def public(entry: dict[str, Any]) -> dict[str, Any]:
    keys = ("name", *SUMMARY_KEYS, "consumers", "snapshot_bytes", "sha256", "seconds")
    return {key: entry.get(key) for key in keys}


def read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise SnapshotError(f"No {MANIFEST} in {path}: not a jetstream_snapshot backup") from None
    except ValueError as error:
        raise SnapshotError(f"{manifest_path} is not valid JSON: {error}") from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("streams"), list):
        raise SnapshotError(f"{manifest_path}: unknown manifest format {manifest.get('format')!r}")
    return manifest


def file_problems(path: Path, entry: dict[str, Any]) -> Iterator[str]:
    """Why the files of one manifest entry cannot be trusted (nothing when they can)."""
    name = entry.get("name", "?")
    checks = (
        (entry.get("snapshot_file") or f"{name}.snapshot", entry.get("sha256"), entry.get("snapshot_bytes")),
        (entry.get("meta_file") or f"{name}.json", entry.get("meta_sha256"), None),
    )
    for filename, expected, size in checks:
        file = path / Path(filename).name
        if not file.is_file():
            yield f"{file} is missing"
        elif size is not None and file.stat().st_size != size:
            yield f"{file} has {file.stat().st_size} bytes, the manifest says {size}"
        elif sha256_of(file) != expected:
            yield f"{file} does not match its sha256 in the manifest (corrupt or modified)"


def checked_backup(params: dict[str, Any]) -> tuple[Path, dict[str, Any], dict[str, Any], list[str]]:
    """The backup's directory, manifest, entries by name and the selected streams, once every
    selected file matches its size and sha256; SnapshotError naming what does not."""
    path = Path(params["path"])
    manifest = read_manifest(path)
    by_name = {entry.get("name"): entry for entry in manifest["streams"]}
    wanted = list(dict.fromkeys(params["streams"])) or list(by_name)
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise SnapshotError(f"Not in {path / MANIFEST}: {', '.join(unknown)}")
    problems = [problem for name in wanted for problem in file_problems(path, by_name[name])]
    if problems:
        raise SnapshotError("Refusing to restore anything: " + "; ".join(problems))
    return path, manifest, by_name, wanted


def is_empty(state: dict[str, Any]) -> bool:
    """Holds no message and never held one: what a freshly created stream is. A stream whose
    messages were all removed (purged, aged out, deleted) keeps its last sequence and is not empty."""
    return int(state.get("messages") or 0) == 0 and int(state.get("last_seq") or 0) == 0


def holds_the_backup(entry: dict[str, Any], state: dict[str, Any]) -> bool:
    """The same messages count, first and last sequence as the backup (the first sequence only
    when there are messages: see verify_restored)."""
    keys = ("messages", "first_seq", "last_seq") if entry["messages"] else ("messages", "last_seq")
    return all(int(state.get(key) or 0) == entry.get(key) for key in keys)


def describe_state(state: dict[str, Any]) -> str:
    messages = int(state.get("messages") or 0)
    if not messages:
        return f"0 messages, last seq {int(state.get('last_seq') or 0)}"
    return f"{messages} messages, seq {int(state.get('first_seq') or 0)}-{int(state.get('last_seq') or 0)}"


async def plan_restore(
    nc: Any, params: dict[str, Any], by_name: dict[str, Any], wanted: list[str], path: Path
) -> tuple[list[tuple[str, str]], dict[str, str], dict[str, Any]]:
    """What each selected stream gets: [(name, action)], {skipped name: why}, {name: live info}.
    Fails before anything is changed when an existing stream may not be replaced."""
    timeout, mode = params["timeout"], params["existing"]
    overwrite = list(dict.fromkeys(params["overwrite"]))
    stray = [name for name in overwrite if name not in wanted]
    if stray:
        raise SnapshotError(
            f"Refusing to restore anything: overwrite names stream(s) this restore does not restore from "
            f"{path / MANIFEST}: {', '.join(stray)}"
        )
    live = {name: await stream_info(nc, name, timeout) for name in wanted}
    plan: list[tuple[str, str]] = []
    skipped: dict[str, str] = {}
    holding: list[str] = []
    for name in wanted:
        info = live[name]
        state = (info or {}).get("state") or {}
        if info is None:
            plan.append((name, "restored"))
        elif name in overwrite:
            plan.append((name, "overwritten"))
        elif mode == "fill" and holds_the_backup(by_name[name], state):
            skipped[name] = f"already holds the messages of the backup ({describe_state(state)})"
        elif mode == "fill" and is_empty(state):
            plan.append((name, "replaced_empty"))
        elif mode == "skip":
            skipped[name] = "exists (existing=skip)"
        else:
            holding.append(name)
    if holding and mode == "fill":
        detail = ", ".join(
            f"{name} ({describe_state(live[name]['state'])}; the backup has {describe_state(by_name[name])})"
            for name in holding
        )
        raise SnapshotError(
            f"Refusing to restore anything: stream(s) hold data that is not in the backup: {detail}. "
            "Name them in overwrite to replace them with the backup (their current messages are lost)"
        )
    if holding:
        raise SnapshotError(
            f"Refusing to restore anything: stream(s) already exist: {', '.join(holding)}"
            " (existing=skip leaves them alone)"
        )
    return plan, skipped, live


async def restore(nc: Any, params: dict[str, Any], check_mode: bool) -> dict[str, Any]:
    path, manifest, by_name, wanted = checked_backup(params)
    timeout = params["timeout"]
    plan, skipped, live = await plan_restore(nc, params, by_name, wanted, path)
    result: dict[str, Any] = {
        "changed": bool(plan),
        "path": str(path),
        "skipped_streams": list(skipped),
        "skip_reasons": skipped,
        "server_version": manifest.get("server_version"),
    }
    if check_mode:
        planned = [public(by_name[name]) | {"action": action, "seconds": None} for name, action in plan]
        return result | {"streams": planned}

    restored: list[dict[str, Any]] = []
    for name, action in plan:
        entry = by_name[name]
        started = time.monotonic()
        try:
            if action == "replaced_empty":
                await delete_empty(nc, name, live[name], timeout)
            elif action == "overwritten":
                await api(nc, f"{API}.STREAM.DELETE.{name}", None, timeout)
            meta = await restore_stream(nc, path, entry, timeout)
        except (SnapshotError, ApiError) as error:
            if action == "restored":
                gone = ""
            elif action == "replaced_empty":
                gone = await recreate_empty(nc, name, live[name], timeout)
            else:
                gone = f"; {name} was deleted for it and is missing now: a rerun restores it"
            raise SnapshotError(f"{error}{gone}", restored) from None
        try:
            aged_out = await verify_restored(nc, entry, meta, timeout)
            if not params["include_consumers"]:
                await delete_consumers(nc, name, timeout)
        except (SnapshotError, ApiError) as error:
            # The stream is there, so the cluster changed; it is left for the operator to judge.
            raise SnapshotError(str(error), [*restored, public(entry) | {"aged_out": None, "action": action}]) from None
        seconds = round(time.monotonic() - started, 3)
        restored.append(public(entry) | {"aged_out": aged_out, "action": action, "seconds": seconds})
    return result | {"streams": restored}


def fence_subject(name: str) -> str:
    return f"_restore_fence.{name}"


async def delete_empty(nc: Any, name: str, info: dict[str, Any], timeout: float) -> None:
    """Deletes a stream found empty, without losing a message published to it meanwhile: its
    subjects are moved to a fence subject first (a publish then finds no stream and is not
    acknowledged), it is checked again, and put back as it was if anything got in."""
    config = dict(info.get("config") or {})
    fenced = bool(config.get("subjects")) and not config.get("mirror")
    if fenced:
        try:
            await api(nc, f"{API}.STREAM.UPDATE.{name}", config | {"subjects": [fence_subject(name)]}, timeout)
        except ApiError as error:
            raise SnapshotError(
                f"{name}: could not stop writes to it before replacing it ({error}); it is unchanged"
            ) from None
    state = ((await stream_info(nc, name, timeout)) or {}).get("state") or {}
    if not is_empty(state):
        undone = "it is as it was"
        if fenced:
            try:
                await api(nc, f"{API}.STREAM.UPDATE.{name}", config, timeout)
            except ApiError as error:
                undone = f"its subjects are still {fence_subject(name)}: put them back ({error})"
        raise SnapshotError(
            f"{name}: was empty when checked, but now holds {describe_state(state)}; not replaced, {undone}"
        )
    await api(nc, f"{API}.STREAM.DELETE.{name}", None, timeout)


async def recreate_empty(nc: Any, name: str, info: dict[str, Any], timeout: float) -> str:
    """Puts back, as it was, an empty stream deleted for a restore that then failed: it held no
    message, so nothing is lost, and the clients that write to it are not left without a stream."""
    try:
        await placed(nc, f"{API}.STREAM.CREATE.{name}", dict(info.get("config") or {}), timeout)
    except (ApiError, nats.errors.Error, TimeoutError) as error:
        return f"; {name} was deleted for it (it was empty) and creating it again failed ({error}): rerun the restore"
    return f"; {name} was created again as it was (empty)"


async def placed(nc: Any, subject: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """A request that places a new stream, asked again while the cluster finds no peers with room
    (see PLACEMENT_WAIT)."""
    deadline = time.monotonic() + PLACEMENT_WAIT
    while True:
        try:
            reply: dict[str, Any] = await api(nc, subject, body, timeout)
            return reply
        except ApiError as error:
            if error.err_code != NO_SUITABLE_PEERS or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(1.0)


async def restore_stream(
    nc: Any, path: Path, entry: dict[str, Any], timeout: float, single_server: bool = False
) -> dict[str, Any]:
    """Restores one stream; returns its saved config and state. With single_server, for a server
    outside a cluster, the config asks for one replica and no placement: such a server refuses more
    (10074), and it takes the stream config from this request, not from the archive."""
    name = entry["name"]
    meta: dict[str, Any] = json.loads((path / Path(entry["meta_file"]).name).read_text())
    config = dict(meta["config"])
    if single_server:
        config["num_replicas"] = 1
        config.pop("placement", None)
    reply = await placed(nc, f"{API}.STREAM.RESTORE.{name}", {"config": config, "state": meta["state"]}, timeout)
    deliver, idle = reply["deliver_subject"], idle_limit(timeout)
    chunk_size = min(RESTORE_CHUNK, int(nc.max_payload or RESTORE_CHUNK))
    try:
        with (path / Path(entry["snapshot_file"]).name).open("rb") as source:
            for chunk in iter(lambda: source.read(chunk_size), b""):
                answer = await send_chunk(nc, deliver, chunk, idle)
                if answer.data:
                    raise SnapshotError(f"{name}: the server rejected a restore chunk: {reply_error(answer.data)}")
        final = await send_chunk(nc, deliver, b"", FINAL_WAIT)
        if final.data and reply_error(final.data):
            raise SnapshotError(f"{name}: the server rejected the restore: {reply_error(final.data)}")
    except (SnapshotError, ApiError, nats.errors.Error, TimeoutError) as error:
        # The stream did not exist before this restore: remove what it left so a rerun starts clean.
        cleaned = await delete_partial(nc, name, timeout)
        raise SnapshotError(f"{error} ({cleaned})") from None
    return meta


async def send_chunk(
    nc: Any, deliver: str, chunk: bytes, timeout: float, retry_for: float = UNHEARD_CHUNK_RETRY
) -> Any:
    """One restore chunk as a request; sent again while nobody is subscribed to `deliver` yet, for
    up to `retry_for` seconds (see UNHEARD_CHUNK_RETRY)."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            return await request(nc, deliver, chunk, timeout)
        except NoResponders:
            if time.monotonic() >= deadline:
                raise NoResponders(
                    deliver, f"no responders for {retry_for:g} s (the server abandoned the restore?)"
                ) from None
            await asyncio.sleep(0.1)


def reply_error(data: bytes) -> str:
    if data.startswith(b"-ERR"):
        return data.decode(errors="replace")
    try:
        parsed = json.loads(data)
    except ValueError:
        return data[:200].decode(errors="replace")
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not error:
        return ""
    return f"{error.get('description')} (err_code {error.get('err_code')})"


async def delete_partial(nc: Any, name: str, timeout: float) -> str:
    """Removes what a failed restore left. Deleted without asking for its info first: a restore its
    leader gave up on leaves the stream's assignment in the meta state with no stream to describe,
    and only a delete removes it. That delete can go unanswered while the failed stream is torn
    down (seen on a loopback trio: no answer in 5 s, and a second delete removed the assignment),
    so it is sent again until the server says deleted or not found (PARTIAL_DELETE_WAIT)."""
    deadline, error = time.monotonic() + PARTIAL_DELETE_WAIT, None
    while True:
        try:
            await api(nc, f"{API}.STREAM.DELETE.{name}", None, timeout)
            return "the partial stream it left was deleted"
        except ApiError as failure:
            if failure.err_code == STREAM_NOT_FOUND:
                return "the partial stream it left was deleted" if error else "no partial stream was left"
            if not isinstance(failure, NoAnswer):
                return f"a partial stream may be left; delete it before retrying ({failure})"
            error = failure
        except (nats.errors.Error, TimeoutError) as failure:
            error = failure
        if time.monotonic() >= deadline:
            return f"a partial stream may be left; delete it before retrying ({error})"
        await asyncio.sleep(1.0)


def parse_ts(value: str) -> datetime:
    """RFC 3339 with nanoseconds, as the server writes it, to a datetime (microseconds)."""
    found = re.fullmatch(r"(.+T[\d:]+)(?:\.(\d+))?(Z|[+-][\d:]+)", value)
    if not found:
        raise ValueError(f"not a timestamp: {value!r}")
    base, fraction, zone = found.groups()
    return datetime.fromisoformat(f"{base}.{(fraction or '0')[:6]:0<6}{'+00:00' if zone == 'Z' else zone}")


def aged_out(entry: dict[str, Any], meta: dict[str, Any], state: dict[str, Any], now: datetime) -> int | None:
    """How many messages at the head of the backup the stream's own limits have removed since it was
    saved (max_age, or message TTLs, which the server drops on restore), when that alone explains a
    difference; None when it does not. The last sequence must always match."""
    config, saved = meta.get("config") or {}, meta.get("state") or {}
    messages, first_seq = int(state.get("messages") or 0), int(state.get("first_seq") or 0)
    if int(state.get("last_seq") or 0) != entry["last_seq"] or messages >= entry["messages"]:
        return None
    if config.get("allow_msg_ttl"):
        return int(entry["messages"] - messages)
    max_age_ns = int(config.get("max_age") or 0)
    if not max_age_ns or first_seq <= entry["first_seq"] or not saved.get("first_ts"):
        return None
    if parse_ts(saved["first_ts"]) + timedelta(microseconds=max_age_ns // 1000) > now:
        return None  # nothing in the backup is old enough to have aged out yet
    return int(entry["messages"] - messages)


async def verify_restored(nc: Any, entry: dict[str, Any], meta: dict[str, Any], timeout: float) -> int:
    """Fails unless the restored stream matches the manifest; returns the messages aged out."""
    name = entry["name"]
    deadline = time.monotonic() + idle_limit(timeout)
    while True:
        try:
            info = await stream_info(nc, name, timeout)
            if info is not None:
                break
        except ApiError:
            pass  # a freshly restored clustered stream may still be electing its leader
        if time.monotonic() > deadline:
            raise SnapshotError(f"{name}: restored, but its stream info did not answer for {idle_limit(timeout):.0f} s")
        await asyncio.sleep(0.5)
    state = info.get("state") or {}
    expired = aged_out(entry, meta, state, datetime.now(UTC))
    if expired is not None:
        return expired
    differs = {
        key: (entry.get(key), int(state.get(key) or 0))
        # An empty stream's first_seq is 0 or last_seq + 1 depending on its history: not compared.
        for key in (("messages", "first_seq", "last_seq") if entry["messages"] else ("messages", "last_seq"))
        if int(state.get(key) or 0) != entry.get(key)
    }
    if differs:
        detail = ", ".join(f"{key} {want} in the manifest but {got} restored" for key, (want, got) in differs.items())
        raise SnapshotError(f"{name}: restored stream does not match the backup: {detail}")
    return 0


async def delete_consumers(nc: Any, name: str, timeout: float) -> None:
    # Names come in pages; deleting empties them, so the first page is asked for again.
    while consumers := (await api(nc, f"{API}.CONSUMER.NAMES.{name}", {"offset": 0}, timeout)).get("consumers"):
        for consumer in consumers:
            await api(nc, f"{API}.CONSUMER.DELETE.{name}.{consumer}", None, timeout)


# The scratch server of a drill: loopback only, no cluster, no monitor port, JetStream in its
# temporary directory. Everything else is nats-server's default, as on the cluster (1 MB payloads).
SCRATCH_CONFIG = """listen: "127.0.0.1:{port}"
server_name: restore-drill
jetstream {{ store_dir: "{store}" }}
"""
SCRATCH_START = 20.0


def loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def binary_version(binary: str) -> str:
    try:
        found = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except OSError as error:
        raise SnapshotError(f"server_binary {binary} cannot run: {error}") from None
    version = re.search(r"v?(\d+\.\d+\.\d+\S*)", found.stdout + found.stderr)
    if found.returncode != 0 or not version:
        raise SnapshotError(
            f"server_binary {binary} is not a nats-server: {(found.stdout + found.stderr).strip()[:200]}"
        )
    return version.group(1)


async def scratch_connection(port: int, process: subprocess.Popen[bytes], log: Path) -> Any:
    """A connection to the scratch server once it listens and JetStream answers."""

    async def quiet(error: Exception) -> None:  # nats-py prints connection errors otherwise
        pass

    deadline = time.monotonic() + SCRATCH_START
    nc = None
    while True:
        if process.poll() is not None:
            raise SnapshotError(f"the scratch nats-server exited ({process.returncode}): {tail(log)}")
        try:
            if nc is None:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
                nc = await nats.connect(
                    f"nats://127.0.0.1:{port}", connect_timeout=2, allow_reconnect=False, error_cb=quiet
                )
            await api(nc, f"{API}.INFO", None, 2.0)
            return nc
        except (nats.errors.Error, OSError, ApiError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            if nc is not None:
                await nc.close()
            raise SnapshotError(f"the scratch nats-server did not answer within {SCRATCH_START:g} s: {tail(log)}")
        await asyncio.sleep(0.1)


def tail(log: Path) -> str:
    try:
        return " / ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
    except OSError:
        return "(no log)"


async def drill(params: dict[str, Any], check_mode: bool) -> dict[str, Any]:
    """Restores the backup into a scratch server and compares it; touches no other server."""
    path, manifest, by_name, wanted = checked_backup(params)
    timeout = params["timeout"]
    result: dict[str, Any] = {"changed": False, "path": str(path), "server_version": manifest.get("server_version")}
    if check_mode:
        return result | {"streams": [public(by_name[name]) | {"seconds": None} for name in wanted]}
    binary = params["server_binary"]
    version = binary_version(binary)
    work = Path(tempfile.mkdtemp(prefix=".restore-drill-", dir=params["work_dir"] or None))
    process: subprocess.Popen[bytes] | None = None
    nc = None
    drilled: list[dict[str, Any]] = []
    try:
        port, log = loopback_port(), work / "nats-server.log"
        config = work / "nats-server.conf"
        config.write_text(SCRATCH_CONFIG.format(port=port, store=work / "store"))
        with log.open("wb") as out:
            process = subprocess.Popen([binary, "-c", str(config)], stdout=out, stderr=subprocess.STDOUT)
        nc = await scratch_connection(port, process, log)
        for name in wanted:
            entry = by_name[name]
            started = time.monotonic()
            try:
                meta = await restore_stream(nc, path, entry, timeout, single_server=True)
                aged_out = await verify_restored(nc, entry, meta, timeout)
            except (SnapshotError, ApiError) as error:
                why = str(error)
                if "10126" in why:
                    why += " (a consumer saved with num_replicas above 1 cannot live on a single scratch server)"
                raise SnapshotError(f"Drill failed: {why}", drilled) from None
            consumers = len(
                (await api(nc, f"{API}.CONSUMER.NAMES.{name}", {"offset": 0}, timeout)).get("consumers") or []
            )
            seconds = round(time.monotonic() - started, 3)
            drilled.append(public(entry) | {"aged_out": aged_out, "restored_consumers": consumers, "seconds": seconds})
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        if process is not None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        shutil.rmtree(work, ignore_errors=True)
    return result | {"streams": drilled, "drill_server_version": version}


async def run(params: dict[str, Any], check_mode: bool) -> dict[str, Any]:
    if params["state"] == "drilled":
        return await drill(params, check_mode)
    timeout = params["timeout"]
    nc = await connect(params, timeout)
    try:
        if params["state"] == "saved":
            return await save(nc, params, check_mode)
        return await restore(nc, params, check_mode)
    finally:
        await nc.close()


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **CONNECTION_ARGUMENT_SPEC,
            "servers": {"type": "list", "elements": "str"},
            "state": {"type": "str", "choices": ["saved", "restored", "drilled"], "required": True},
            "path": {"type": "path", "required": True},
            "streams": {"type": "list", "elements": "str", "default": []},
            "include_consumers": {"type": "bool", "default": True},
            "existing": {"type": "str", "choices": ["fail", "skip", "fill"], "default": "fail"},
            "overwrite": {"type": "list", "elements": "str", "default": []},
            "force": {"type": "bool", "default": False},
            "timeout": {"type": "float", "default": 5.0},
            "server_binary": {"type": "path"},
            "work_dir": {"type": "path"},
        },
        required_if=[
            ("state", "saved", ["servers"]),
            ("state", "restored", ["servers"]),
            ("state", "drilled", ["server_binary"]),
        ],
        supports_check_mode=True,
    )
    if not HAS_NATS:
        module.fail_json(msg="jetstream_snapshot needs nats-py on the controller (pip install nats-py)")
    if module.params["state"] == "drilled" and module.params["servers"]:
        module.fail_json(msg="state=drilled connects to no cluster: do not pass servers")
    try:
        result = asyncio.run(run(module.params, module.check_mode))
    except SnapshotError as error:
        module.fail_json(
            msg=str(error), changed=bool(error.restored), streams=error.restored, path=module.params["path"]
        )
    except (ApiError, ConnectError) as error:
        module.fail_json(msg=str(error), path=module.params["path"])
    except (nats.errors.Error, OSError, TimeoutError, ValueError) as error:
        module.fail_json(msg=f"JetStream snapshot: {type(error).__name__}: {error}", path=module.params["path"])
    module.exit_json(**result)


if __name__ == "__main__":
    main()
