"""Secrets and logins for nats-server.conf, as Ansible filters.

`nats_bcrypt` turns a password into the bcrypt hash nats-server compares client passwords with,
so the config never holds the password itself. The salt is derived from a public seed (cluster and
user name) rather than drawn at random: the same password then gives the same hash on every run,
and an unchanged password does not rewrite the config and reload every node on each deploy.
A salt only has to be unique per cluster and user, not secret; one derived from the password
would leak a fast check of it, so the seed must never contain a secret.

`nats_secret_summary` describes a secret without revealing it, for the preflight checks.

`nats_app_client_users` turns the applications declared in the inventory into the application
account's users: each with its hash and least-privilege permissions (what the CIM's client does,
nothing that destroys the store), and `nats_app_client_summaries` describes them for the preflight.

Ansible's own `password_hash('bcrypt')` needs passlib, which is not installed here and is
unmaintained; the `bcrypt` package does the hashing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import bcrypt

# nats-server's own `nats server passwd` uses cost 11: each client connect pays it once.
DEFAULT_COST = 11
# bcrypt's base64 alphabet, in the order of the standard one it replaces.
_STANDARD = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BCRYPT = b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_TO_BCRYPT = bytes.maketrans(_STANDARD, _BCRYPT)
# Characters a password may use inside a nats-route:// URL without escaping.
URL_SAFE_RE = re.compile(r"^[A-Za-z0-9._~-]+$")
JS_API = "$JS.API"


def _salt(seed: str, cost: int) -> bytes:
    digest = hashlib.sha256(seed.encode()).digest()[:16]
    encoded = base64.b64encode(digest)[:22].translate(_TO_BCRYPT)
    return b"$2b$%02d$" % cost + encoded


def nats_bcrypt(password: Any, salt_seed: str, cost: int = DEFAULT_COST) -> str:
    """The bcrypt hash of `password` for nats-server.conf; the same inputs give the same hash."""
    if not isinstance(password, str) or not password:
        raise ValueError("nats_bcrypt: the password is empty or not a string")
    if len(password.encode()) > 72:
        raise ValueError("nats_bcrypt: bcrypt uses at most 72 bytes of a password; use a shorter one")
    return bcrypt.hashpw(password.encode(), _salt(str(salt_seed), int(cost))).decode()


def nats_secret_summary(secret: Any) -> dict[str, Any]:
    """What the preflight may know about a secret: whether it is set, its length, its alphabet."""
    if secret is not None and not isinstance(secret, str):
        # A YAML number or list where a password belongs: say so rather than "not set".
        kind = (
            "true/false value"
            if isinstance(secret, bool)
            else "number"
            if isinstance(secret, int | float)
            else "list or mapping"
        )
        return {"set": False, "kind": kind, "length": 0, "bytes": 0, "url_safe": False}
    if not secret:
        return {"set": False, "kind": "text", "length": 0, "bytes": 0, "url_safe": False}
    return {
        "set": True,
        "kind": "text",
        "length": len(secret),
        # bcrypt reads at most 72 bytes: a password of 40 "é" is 80.
        "bytes": len(secret.encode()),
        "url_safe": bool(URL_SAFE_RE.match(secret)),
    }


def event_stream_permissions(
    streams: Sequence[str], protected_consumers: Mapping[str, Sequence[str]]
) -> dict[str, Any]:
    """The JetStream API subjects an event-store client needs on `streams`, and nothing more.

    Allowed: account and stream info, direct and plain message get, creating, reading and deleting
    consumers (the CIM's per-read ephemerals), pulling, acking and flow control. Not allowed:
    creating, updating, deleting or purging a stream, deleting a message, and deleting a consumer
    the inventory declares (protected_consumers: stream -> names). Subjects from nats-server's
    jetstream_api.go ($JS.API.*) and the ack/flow-control reply subjects ($JS.ACK, $JS.FC)."""
    allow = [f"{JS_API}.INFO", f"{JS_API}.STREAM.NAMES"]
    deny = []
    for stream in streams:
        allow += [
            f"{JS_API}.STREAM.INFO.{stream}",
            f"{JS_API}.STREAM.MSG.GET.{stream}",
            f"{JS_API}.DIRECT.GET.{stream}",
            f"{JS_API}.DIRECT.GET.{stream}.>",
            # CONSUMER.CREATE.<stream> (ephemeral, older clients) and .<stream>.<name>[.<filter>].
            f"{JS_API}.CONSUMER.CREATE.{stream}",
            f"{JS_API}.CONSUMER.CREATE.{stream}.>",
            f"{JS_API}.CONSUMER.DURABLE.CREATE.{stream}.*",
            f"{JS_API}.CONSUMER.INFO.{stream}.*",
            f"{JS_API}.CONSUMER.NAMES.{stream}",
            f"{JS_API}.CONSUMER.LIST.{stream}",
            f"{JS_API}.CONSUMER.DELETE.{stream}.*",
            f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.*",
            f"$JS.ACK.{stream}.>",
            f"$JS.FC.{stream}.>",
        ]
        deny += [f"{JS_API}.CONSUMER.DELETE.{stream}.{name}" for name in protected_consumers.get(stream, ())]
    return {"allow": allow, "deny": deny}


def _declared_consumers(declared_streams: Any) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for stream in declared_streams or []:
        if isinstance(stream, Mapping) and stream.get("name"):
            names = [c["name"] for c in stream.get("consumers") or [] if isinstance(c, Mapping) and c.get("name")]
            found[str(stream["name"])] = names
    return found


def nats_app_client_users(clients: Any, cluster_name: str, declared_streams: Any = ()) -> list[dict[str, Any]]:
    """The declared applications as account users: {user, password (bcrypt hash), permissions}.
    A client declares `name`, `password` (vaulted), `streams` (event streams it reads and appends
    to) and `publish` (subjects it may publish to: its streams' subjects)."""
    protected = _declared_consumers(declared_streams)
    users = []
    for client in clients or []:
        name = str(client["name"])
        stream_api = event_stream_permissions([str(s) for s in client.get("streams") or []], protected)
        permissions: dict[str, Any] = {
            "publish": {"allow": [str(s) for s in client.get("publish") or []] + stream_api["allow"]},
            # Replies to its requests, and the messages its pull consumers deliver, come to its inbox.
            "subscribe": {"allow": ["_INBOX.>"]},
        }
        if stream_api["deny"]:
            permissions["publish"]["deny"] = stream_api["deny"]
        password_hash = nats_bcrypt(client.get("password"), f"{cluster_name}/{name}")
        users.append(
            {
                "user": name,
                "password": password_hash,
                "permissions": permissions,
                # As nats-server.conf reads it (JSON; jinja2's tojson would escape '>' as \u003e,
                # which the config parser refuses).
                "conf": json.dumps({"user": name, "password": password_hash, "permissions": permissions}),
            }
        )
    return users


def nats_app_client_summaries(clients: Any) -> Any:
    """The declared applications with each password replaced by its summary, for the preflight."""
    if not isinstance(clients, list):
        return clients
    return [
        {k: v for k, v in c.items() if k != "password"} | {"password": nats_secret_summary(c.get("password"))}
        if isinstance(c, Mapping)
        else c
        for c in clients
    ]


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Any]:
        return {
            "nats_bcrypt": nats_bcrypt,
            "nats_secret_summary": nats_secret_summary,
            "nats_app_client_users": nats_app_client_users,
            "nats_app_client_summaries": nats_app_client_summaries,
        }
