#!/usr/bin/python
"""Ansible module: remove a member lost for good from the JetStream meta group and from the streams'
peer sets, and wait until every replicated stream has its full count of current replicas again."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: jetstream_peers
short_description: Remove lost servers from JetStream's meta group and streams, then wait for the replicas
description:
  - The peers to remove are the servers the meta group knows that are not in I(members) (the
    inventory's server names), or the ones named in I(remove); a member is never removed. A peer
    to remove must stop being current (the leader counts a dead server current for some seconds)
    within I(wait); a running server is never removed (shrinking the cluster drains members first).
  - I(scope=meta) logs in to the system account and sends C($JS.API.SERVER.REMOVE) for each peer to
    remove, then waits until the meta leader lists none of them. A removed server name is refused
    by the cluster from then on, so its replacement needs a new C(server_name).
  - I(scope=rescue) logs in to the system account of a cluster that has lost its meta majority for
    good and sends C($JS.API.META.RESCUE) with I(quorum_needed), answered by every server still
    running (nats-server 2.15): each lowers its meta quorum for 5 minutes, so the survivors elect a
    leader. It refuses when any server still sees a meta leader, and waits until the survivors
    have one. Remove the lost peers (I(scope=meta)) within those 5 minutes.
  - I(scope=streams) logs in to an account with JetStream and sends
    C($JS.API.STREAM.PEER.REMOVE.<stream>) for each stream that still lists a removed or unknown
    peer (the server usually does this itself on a meta removal). It then waits until every stream
    with more than one replica has that many peers, all in I(members) and all current.
options:
  servers:
    description: Client URLs of the cluster (tls:// for TLS, never the login in clear).
    type: list
    elements: str
    required: true
  user:
    description: The login, the system account's user for I(scope=meta).
    type: str
  password:
    description: The login's password.
    type: str
  tls_ca_file:
    description: The CA that signed the servers' certificates.
    type: path
  scope:
    description: >-
      C(meta), the meta group in the system account; C(rescue), its quorum lowered on the survivors;
      C(streams), the streams of the login's account.
    type: str
    choices: [meta, rescue, streams]
    required: true
  quorum_needed:
    description: rescue, the meta quorum the survivors lower theirs to (how many of them there are).
    type: int
  members:
    description: The server names the cluster should have (the inventory's nats_server_name of each member).
    type: list
    elements: str
    required: true
  remove:
    description: Server names to remove; by default every peer not in I(members).
    type: list
    elements: str
    default: []
  wait:
    description: Seconds to wait for the meta leader's view (meta) or for the streams' replicas (streams).
    type: float
    default: 120
notes:
  - Supports check mode, nothing is removed; the result says what would be.
author: cim-nats-infra
"""

EXAMPLES = r"""
- name: Replace node | remove the lost peer from the meta group
  jetstream_peers:
    servers: [tls://10.0.20.1:4222, tls://10.0.20.2:4222]
    user: sys
    password: "{{ nats_server_system_password }}"
    tls_ca_file: /etc/nats-server/tls/ca.crt
    scope: meta
    members: [nats-1, nats-2, nats-3-2]
  delegate_to: localhost
"""

RETURN = r"""
leader:
  description: meta, the meta leader's name.
  returned: success
  type: str
peers:
  description: meta, the meta group's servers (the leader's view) once done, each with current and offline.
  returned: success
  type: list
removed:
  description: The server names removed (meta), or STREAM/server pairs removed (streams).
  returned: always
  type: list
running:
  description: meta, the peers to remove that the leader still counts as current.
  returned: success
  type: list
missing:
  description: meta, members the meta group does not list yet (a replacement not started).
  returned: success
  type: list
rescued:
  description: rescue, each answering server with its previous and new quorum.
  returned: success
  type: list
streams:
  description: streams, each replicated stream with its replicas and the current ones.
  returned: success
  type: list
"""

import asyncio
import json
import time
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.jetstream_api import (
    CONNECTION_ARGUMENT_SPEC,
    JS_API,
    ApiError,
    ConnectError,
    api,
    connect,
    paged,
)

try:
    import nats

    HAS_NATS = True
except ImportError:
    HAS_NATS = False

REQUEST_TIMEOUT = 5.0
# Every server answers a PING; this long is allowed for the answers to come in.
PING_WINDOW = 1.0
POLL_INTERVAL = 1.0


class Refused(Exception):
    """The request cannot be carried out safely: nothing (more) is removed."""


def meta_view(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """The meta leader's view among the servers' JSZ answers: leader, and peers by name."""
    for answer in answers:
        meta = (answer.get("data") or {}).get("meta_cluster") or {}
        name = (answer.get("server") or {}).get("name")
        if meta.get("leader") and meta.get("leader") == name:
            peers = {name: {"current": True, "offline": False}}
            for replica in meta.get("replicas") or []:
                peers[replica["name"]] = {
                    "current": bool(replica.get("current")),
                    "offline": bool(replica.get("offline")),
                }
            return {"leader": name, "peers": peers}
    seen = sorted({str((a.get("data") or {}).get("meta_cluster", {}).get("leader")) for a in answers})
    raise Refused(f"no meta leader answered (leaders named: {', '.join(seen) or 'none'}); the cluster has no quorum")


def to_remove(peers: dict[str, dict[str, Any]], members: list[str], remove: list[str]) -> list[str]:
    """The peers to remove (named, or every one not a member), refused when one is a member."""
    named_members = sorted(set(remove) & set(members))
    if named_members:
        raise Refused(f"{', '.join(named_members)} in remove: a member of the inventory is never removed here")
    wanted = remove or sorted(p for p in peers if p not in members)
    return [p for p in wanted if p in peers]


def running(peers: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """Those of `names` the meta leader still counts as current: for some seconds after a server
    dies, and for good when it is in fact running."""
    return [p for p in names if p in peers and peers[p]["current"]]


async def gather_answers(nc: Any, subject: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Every server's answer to a request all of them answer, collected for PING_WINDOW."""
    inbox = nc.new_inbox()
    answers: list[dict[str, Any]] = []
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, json.dumps(payload).encode(), reply=inbox)
        deadline = time.monotonic() + PING_WINDOW
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            answers.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()
    return answers


async def jsz_answers(nc: Any) -> list[dict[str, Any]]:
    return await gather_answers(nc, "$SYS.REQ.SERVER.PING.JSZ", {})


async def run_meta(nc: Any, params: dict[str, Any], check_mode: bool) -> dict[str, Any]:
    view = meta_view(await jsz_answers(nc))
    removing = to_remove(view["peers"], params["members"], params["remove"])
    removed: list[str] = []
    if not check_mode and removing:
        # Only a server that is gone is removed: wait for the leader to stop counting it current.
        deadline = time.monotonic() + params["wait"]
        while still := running(view["peers"], removing):
            if time.monotonic() > deadline:
                raise Refused(
                    f"{', '.join(still)}: still current in the meta group after {params['wait']:g} s; "
                    "a running server is never removed (stop it first)"
                )
            await asyncio.sleep(POLL_INTERVAL)
            view = await leader_view(nc, view)
        for peer in removing:
            await api(nc, f"{JS_API}.SERVER.REMOVE", {"peer": peer}, REQUEST_TIMEOUT)
            removed.append(peer)
        while set(removing) & set(view["peers"]):
            if time.monotonic() > deadline:
                raise Refused(
                    f"removed {', '.join(removed)}, but after {params['wait']:g} s the meta leader "
                    f"{view['leader']} still lists {', '.join(sorted(set(removing) & set(view['peers'])))}"
                )
            await asyncio.sleep(POLL_INTERVAL)
            view = await leader_view(nc, view)
    peers = view["peers"]
    return {
        "changed": bool(removing),
        "removed": removed if not check_mode else removing,
        "running": running(peers, removing),
        "leader": view["leader"],
        "peers": [{"name": name, **state} for name, state in sorted(peers.items())],
        "missing": sorted(set(params["members"]) - set(peers)),
    }


async def leader_view(nc: Any, last: dict[str, Any]) -> dict[str, Any]:
    """The meta leader's view now, or the last one while a leader is being elected."""
    try:
        return meta_view(await jsz_answers(nc))
    except Refused:
        return last


def stream_shortfall(info: dict[str, Any], members: list[str]) -> str | None:
    """Why a replicated stream is not whole (peers missing, foreign or behind), or None."""
    replicas = int(info["config"].get("num_replicas") or 1)
    cluster = info.get("cluster") or {}
    if replicas <= 1:
        return None
    peers = ([cluster["leader"]] if cluster.get("leader") else []) + [r["name"] for r in cluster.get("replicas") or []]
    behind = [r["name"] for r in cluster.get("replicas") or [] if not r.get("current")]
    foreign = [p for p in peers if p not in members]
    if not cluster.get("leader"):
        return "no leader"
    if len(peers) < replicas or foreign or behind:
        details = [f"{len(peers)} of {replicas} peers"]
        details += [f"not a member: {', '.join(foreign)}"] if foreign else []
        details += [f"behind: {', '.join(behind)}"] if behind else []
        return "; ".join(details)
    return None


async def run_streams(nc: Any, params: dict[str, Any], check_mode: bool) -> dict[str, Any]:
    members = params["members"]
    infos, _ = await paged(nc, f"{JS_API}.STREAM.LIST", "streams", REQUEST_TIMEOUT)
    removed: list[str] = []
    for info in infos:
        cluster = info.get("cluster") or {}
        peers = [r["name"] for r in cluster.get("replicas") or []]
        for peer in peers:
            if peer not in members and (not params["remove"] or peer in params["remove"]):
                name = info["config"]["name"]
                if not check_mode:
                    await api(nc, f"{JS_API}.STREAM.PEER.REMOVE.{name}", {"peer": peer}, REQUEST_TIMEOUT)
                removed.append(f"{name}/{peer}")
    short: dict[str, str] = {}
    deadline = time.monotonic() + (0 if check_mode else params["wait"])
    while True:
        infos, _ = await paged(nc, f"{JS_API}.STREAM.LIST", "streams", REQUEST_TIMEOUT)
        short = {i["config"]["name"]: why for i in infos if (why := stream_shortfall(i, members))}
        if not short or time.monotonic() > deadline:
            break
        await asyncio.sleep(POLL_INTERVAL)
    if short and not check_mode:
        raise Refused(
            f"after {params['wait']:g} s, streams short of current replicas: "
            + "; ".join(f"{name} ({why})" for name, why in sorted(short.items()))
        )
    return {
        "changed": bool(removed),
        "removed": removed,
        "streams": [
            {
                "name": i["config"]["name"],
                "replicas": int(i["config"].get("num_replicas") or 1),
                "leader": (i.get("cluster") or {}).get("leader"),
                "current": [r["name"] for r in (i.get("cluster") or {}).get("replicas") or [] if r.get("current")],
                "short": short.get(i["config"]["name"]),
            }
            for i in infos
            if int(i["config"].get("num_replicas") or 1) > 1
        ],
    }


def seen_leaders(answers: list[dict[str, Any]]) -> list[str]:
    """The meta leaders the answering servers name (none once the majority is lost)."""
    metas = [(a.get("data") or {}).get("meta_cluster") or {} for a in answers]
    return sorted({str(m["leader"]) for m in metas if m.get("leader")})


async def run_rescue(nc: Any, params: dict[str, Any], check_mode: bool) -> dict[str, Any]:
    # A survivor names the last leader it knew until its election timeout (seconds): wait it out.
    deadline = time.monotonic() + params["wait"]
    while leaders := seen_leaders(answers := await jsz_answers(nc)):
        if time.monotonic() > deadline:
            raise Refused(
                f"the cluster has a meta leader ({', '.join(leaders)}): no majority is lost; "
                "replace the lost members with replace-node.yml"
            )
        await asyncio.sleep(POLL_INTERVAL)
    if not answers:
        raise Refused("no server answered in the system account: nothing to rescue from")
    if check_mode:
        return {"changed": True, "rescued": [], "leader": None}
    rescued = await gather_answers(nc, "$JS.API.META.RESCUE", {"quorum_needed": params["quorum_needed"]})
    refused = [a for a in rescued if a.get("error")]
    if refused or not rescued:
        why = "; ".join(f"{a.get('server', '?')}: {a['error'].get('description')}" for a in refused)
        raise Refused(f"meta rescue refused ({why or 'no server answered'})")
    deadline = time.monotonic() + params["wait"]
    while True:
        try:
            view = meta_view(await jsz_answers(nc))
            break
        except Refused:
            if time.monotonic() > deadline:
                raise Refused(f"meta rescue applied, but no meta leader within {params['wait']:g} s") from None
            await asyncio.sleep(POLL_INTERVAL)
    return {
        "changed": True,
        "rescued": [
            {"server": a.get("server"), "prev_quorum": a.get("prev_quorum"), "new_quorum": a.get("new_quorum")}
            for a in rescued
        ],
        "leader": view["leader"],
    }


async def run(params: dict[str, Any], check_mode: bool) -> dict[str, Any]:
    nc = await connect(params, REQUEST_TIMEOUT)
    try:
        if params["scope"] == "meta":
            return await run_meta(nc, params, check_mode)
        if params["scope"] == "rescue":
            return await run_rescue(nc, params, check_mode)
        return await run_streams(nc, params, check_mode)
    finally:
        await nc.close()


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **CONNECTION_ARGUMENT_SPEC,
            "scope": {"type": "str", "choices": ["meta", "rescue", "streams"], "required": True},
            "quorum_needed": {"type": "int"},
            "members": {"type": "list", "elements": "str", "required": True},
            "remove": {"type": "list", "elements": "str", "default": []},
            "wait": {"type": "float", "default": 120.0},
        },
        required_if=[("scope", "rescue", ["quorum_needed"])],
        supports_check_mode=True,
    )
    if not HAS_NATS:
        module.fail_json(msg="jetstream_peers needs nats-py on the controller (pip install nats-py)", removed=[])
    if not module.params["members"]:
        module.fail_json(msg="members is empty: the inventory's server names are needed", removed=[])
    budget = module.params["wait"] + 60
    try:
        result = asyncio.run(asyncio.wait_for(run(module.params, module.check_mode), budget))
    except (Refused, ApiError, ConnectError) as error:
        module.fail_json(msg=str(error), removed=[])
    except TimeoutError:
        module.fail_json(msg=f"no answer from the cluster within {budget:g} s", removed=[])
    except (nats.errors.Error, OSError) as error:
        module.fail_json(msg=f"NATS: {type(error).__name__}: {error}", removed=[])
    module.exit_json(**result)


if __name__ == "__main__":
    main()
