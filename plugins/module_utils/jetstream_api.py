"""Raw JetStream API requests for the modules that run on the controller.

nats-py's JetStream helpers return one page of a list and drop fields (the server's `ts`), and it
has no snapshot/restore at all, so the modules speak the API's JSON themselves, through here.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Mapping
from typing import Any

try:
    import nats

    HAS_NATS = True
except ImportError:  # the modules report a missing nats-py themselves
    HAS_NATS = False

JS_API = "$JS.API"

# How every module reaches the cluster: its argument_spec takes these, `connect` uses them.
CONNECTION_ARGUMENT_SPEC: dict[str, Any] = {
    "servers": {"type": "list", "elements": "str", "required": True},
    "user": {"type": "str"},
    "password": {"type": "str", "no_log": True},
    "tls_ca_file": {"type": "path"},
}
STREAM_NOT_FOUND = 10059


class ApiError(Exception):
    """A JetStream API request that failed: an error reply, no responders, or no answer in time."""

    def __init__(self, subject: str, description: str, err_code: int = 0) -> None:
        super().__init__(f"{subject}: {description}" + (f" (err_code {err_code})" if err_code else ""))
        self.err_code = err_code


class NoAnswer(ApiError):
    """Nobody answered: JetStream off, a stream without a leader, or a slow cluster."""


class NoResponders(NoAnswer):
    """Nobody was subscribed to the subject: the request reached no one."""


class ConnectError(Exception):
    pass


async def request(nc: Any, subject: str, body: bytes, timeout: float) -> Any:
    """nc.request, with no responders or a timeout reported against the subject."""
    try:
        return await nc.request(subject, body, timeout=timeout)
    except nats.errors.NoRespondersError:
        raise NoResponders(subject, "no responders (JetStream not enabled, or the stream has no leader?)") from None
    except nats.errors.TimeoutError:
        raise NoAnswer(subject, f"no answer within {timeout:g} s") from None


async def api(nc: Any, subject: str, payload: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    """One API request; its JSON answer, or ApiError with the server's description and err_code."""
    reply = await request(nc, subject, json.dumps(payload).encode() if payload is not None else b"", timeout)
    data: dict[str, Any] = json.loads(reply.data)
    if data.get("error"):
        err = data["error"]
        raise ApiError(subject, str(err.get("description", err)), int(err.get("err_code") or 0))
    return data


async def paged(nc: Any, subject: str, key: str, timeout: float) -> tuple[list[Any], list[str]]:
    """All items of a list API (256 consumers or 1024 names a page), and any names the server
    reported it could not include (`missing`, when consumer leaders do not answer in a cluster)."""
    items: list[Any] = []
    missing: list[str] = []
    offset = 0
    while True:
        data = await api(nc, subject, {"offset": offset}, timeout)
        page = data.get(key) or []
        items.extend(page)
        missing.extend(data.get("missing") or [])
        offset += len(page)
        if not page or offset >= int(data.get("total") or 0):
            return items, missing


async def stream_info(nc: Any, name: str, timeout: float) -> dict[str, Any] | None:
    """STREAM.INFO, or None when the stream does not exist."""
    try:
        return await api(nc, f"{JS_API}.STREAM.INFO.{name}", None, timeout)
    except ApiError as error:
        if error.err_code == STREAM_NOT_FOUND:
            return None
        raise


def login_options(params: Mapping[str, Any]) -> dict[str, Any]:
    """nats.connect keywords for the user, password and CA among a module's parameters."""
    options: dict[str, Any] = {}
    if params.get("user"):
        options["user"] = params["user"]
        options["password"] = params.get("password") or ""
    if params.get("tls_ca_file"):
        options["tls"] = ssl.create_default_context(cafile=params["tls_ca_file"])
    return options


async def connect(params: Mapping[str, Any], timeout: float) -> Any:
    """A connection within `timeout`, or ConnectError naming the servers and the last error (which
    nats-py would otherwise print to stderr). `params` holds CONNECTION_ARGUMENT_SPEC's keys."""
    servers = list(params["servers"])
    errors: list[str] = []

    async def note(error: Exception) -> None:
        errors.append(f"{type(error).__name__}: {error}")

    try:
        options = login_options(params)
    except (OSError, ssl.SSLError) as error:
        raise ConnectError(f"cannot read tls_ca_file {params.get('tls_ca_file')}: {error}") from error
    try:
        return await asyncio.wait_for(
            nats.connect(servers=servers, connect_timeout=timeout, max_reconnect_attempts=2, error_cb=note, **options),
            timeout,
        )
    except (TimeoutError, nats.errors.Error, OSError) as error:
        last = errors[-1] if errors else f"{type(error).__name__}: {error}"
        raise ConnectError(f"cannot connect to {', '.join(servers)} within {timeout:g} s ({last})") from error
