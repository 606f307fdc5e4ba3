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


def test_summary_tells_nothing_of_the_secret() -> None:
    summary = secrets.nats_secret_summary("abc-DEF_123.x~y")
    assert summary == {"set": True, "length": 15, "url_safe": True}
    assert secrets.nats_secret_summary("has/slash")["url_safe"] is False
    assert secrets.nats_secret_summary(None) == {"set": False, "length": 0, "url_safe": False}
