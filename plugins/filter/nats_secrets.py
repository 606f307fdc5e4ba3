"""Secrets for nats-server.conf, as Ansible filters.

`nats_bcrypt` turns a password into the bcrypt hash nats-server compares client passwords with,
so the config never holds the password itself. The salt is derived from a public seed (cluster and
user name) rather than drawn at random: the same password then gives the same hash on every run,
and an unchanged password does not rewrite the config and reload every node on each deploy.
A salt only has to be unique per cluster and user, not secret; one derived from the password
would leak a fast check of it, so the seed must never contain a secret.

`nats_secret_summary` describes a secret without revealing it, for the preflight checks.

Ansible's own `password_hash('bcrypt')` needs passlib, which is not installed here and is
unmaintained; the `bcrypt` package does the hashing.
"""

from __future__ import annotations

import base64
import hashlib
import re
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
    if secret is None or not isinstance(secret, str) or secret == "":
        return {"set": False, "length": 0, "url_safe": False}
    return {"set": True, "length": len(secret), "url_safe": bool(URL_SAFE_RE.match(secret))}


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Any]:
        return {"nats_bcrypt": nats_bcrypt, "nats_secret_summary": nats_secret_summary}
