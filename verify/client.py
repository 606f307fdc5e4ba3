"""nats-py connections for the checks: short timeouts, no endless reconnecting, and TLS or nothing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from nats.aio.client import Client

from verify.shared_code import module_util


class HasRemaining(Protocol):
    def remaining(self) -> float: ...


async def connect_tls_or_nothing(servers: str | list[str], **options: Any) -> Client:
    """nats.connect (same arguments), except that a tls:// URL or a `tls` context means TLS or
    nothing: a server that does not offer TLS gets no CONNECT, so no password, and the call raises
    "host:port does not offer TLS ...". The modules' guard (plugins/module_utils/jetstream_api.py)."""
    nc: Client = await module_util("jetstream_api").connect_tls_or_nothing(servers, **options)
    return nc


async def connect(
    servers: list[str],
    state: HasRemaining | None = None,
    name: str = "nats-verify",
    login: Mapping[str, Any] | None = None,
) -> Client:
    """`login`: user, password and TLS context (Cluster.login()). A server without TLS raises the
    refusal (TlsRefused) rather than nats-py's bare "no servers available"."""
    budget = 2.0 if state is None else min(2.0, max(0.5, state.remaining()))

    async def ignore(_: Exception) -> None:
        return None

    return await connect_tls_or_nothing(
        servers=servers,
        name=name,
        connect_timeout=budget,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.2,
        allow_reconnect=True,
        error_cb=ignore,
        **(login or {}),
    )
