"""The password hashing the config relies on (plugins/filter/nats_secrets.py), as plain Python."""

from __future__ import annotations

import bcrypt
import pytest

from tests.helpers import load_filter_plugin

secrets = load_filter_plugin("nats_secrets")


def test_hash_verifies_the_password_and_is_stable_per_seed() -> None:
    digest = secrets.nats_bcrypt("correct horse battery", "phx-cluster/cim")
    assert digest.startswith("$2b$11$")
    assert bcrypt.checkpw(b"correct horse battery", digest.encode())
    assert not bcrypt.checkpw(b"correct horse battery!", digest.encode())
    # Same inputs, same hash: an unchanged password leaves the config unchanged.
    assert secrets.nats_bcrypt("correct horse battery", "phx-cluster/cim") == digest


def test_salt_differs_per_user_and_cluster_and_hides_the_password() -> None:
    hashes = {
        secrets.nats_bcrypt("same password here", seed) for seed in ("phx-cluster/cim", "phx-cluster/sys", "lab/cim")
    }
    assert len(hashes) == 3
    # The salt comes from the seed alone: a different password keeps the salt, changes the hash.
    first, second = (secrets.nats_bcrypt(p, "phx-cluster/cim") for p in ("password one xx", "password two xx"))
    assert first[:29] == second[:29] and first != second


@pytest.mark.parametrize("bad", ["", None, 42, "x" * 73])
def test_unusable_passwords_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="nats_bcrypt"):
        secrets.nats_bcrypt(bad, "seed")


def bcrypt_matches(password: str, hashed: str) -> bool:
    return bool(bcrypt.checkpw(password.encode(), hashed.encode()))


def test_summary_tells_nothing_of_the_secret() -> None:
    summary = secrets.nats_secret_summary("abc-DEF_123.x~y")
    assert summary == {"set": True, "kind": "text", "length": 15, "bytes": 15, "url_safe": True}
    assert secrets.nats_secret_summary("has/slash")["url_safe"] is False
    assert secrets.nats_secret_summary("é" * 40)["bytes"] == 80
    assert secrets.nats_secret_summary(None) == {
        "set": False,
        "kind": "text",
        "length": 0,
        "bytes": 0,
        "url_safe": False,
    }
    # A YAML number where a password belongs is told apart from a missing one (never its value).
    assert secrets.nats_secret_summary(1234567890123456) == {
        "set": False,
        "kind": "number",
        "length": 0,
        "bytes": 0,
        "url_safe": False,
    }
    assert secrets.nats_secret_summary(True)["kind"] == "true/false value"
    assert secrets.nats_secret_summary(["a"])["kind"] == "list or mapping"


def test_an_application_gets_its_streams_and_no_destructive_subject() -> None:
    (cim,) = secrets.nats_app_client_users(
        [{"name": "cim", "password": "p" * 20, "streams": ["EV"], "publish": ["ev.>"]}],
        "c",
        [{"name": "EV", "consumers": [{"name": "projector"}]}],
    )
    allowed = cim["permissions"]["publish"]["allow"]
    assert "ev.>" in allowed and "$JS.API.CONSUMER.MSG.NEXT.EV.*" in allowed and "$JS.ACK.EV.>" in allowed
    assert not [
        s
        for s in allowed
        if any(w in s for w in ("STREAM.DELETE", "PURGE", "MSG.DELETE", "STREAM.CREATE", "STREAM.UPDATE"))
    ]
    assert cim["permissions"]["publish"]["deny"] == ["$JS.API.CONSUMER.DELETE.EV.projector"]
    assert bcrypt_matches("p" * 20, cim["password"]) and "\\u00" not in cim["conf"]
