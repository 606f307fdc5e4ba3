"""nats-py connections for the checks: short timeouts, no endless reconnecting."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import nats
from nats.aio.client import Client


class HasRemaining(Protocol):
    def remaining(self) -> float: ...


async def connect(
    servers: list[str],
    state: HasRemaining | None = None,
    name: str = "nats-verify",
    login: Mapping[str, Any] | None = None,
) -> Client:
    """`login`: user, password and TLS context (Cluster.login())."""
    budget = 2.0 if state is None else min(2.0, max(0.5, state.remaining()))

    async def ignore(_: Exception) -> None:
        return None

    return await nats.connect(
        servers=servers,
        name=name,
        connect_timeout=budget,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.2,
        allow_reconnect=True,
        error_cb=ignore,
        **(login or {}),
    )
