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
from urllib.parse import ParseResult

try:
    import nats
    from nats.aio.client import Client
    from nats.aio.transport import TcpTransport

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


if HAS_NATS:

    class TlsRefused(nats.errors.Error):
        """TLS was asked for and the server did not offer it: CONNECT, with the login, was not sent."""

        def __init__(self, server: str) -> None:
            super().__init__(f"{server} does not offer TLS: the login is not sent in clear")
            self.server = server

    class TlsOrNothingClient(Client):
        """A nats-py client for which a tls:// URL or a TLS context means TLS or nothing.

        nats-py upgrades to TLS only when the server's INFO says tls_required; otherwise it sends
        CONNECT, user and password included, in clear. It has no option against that, so this
        overrides its private hooks (nats-py 2.16, pinned <3): _connect_command, which builds
        CONNECT, refuses, and _setup_server_pool notes whether any URL asked for TLS.
        """

        def __init__(self) -> None:
            super().__init__()
            self._tls_urls = False
            self._refused: set[str] = set()
            self._refusal: TlsRefused | None = None
            self._first_connect = False

        async def connect(self, *args: Any, **kwargs: Any) -> None:
            self._first_connect = True
            try:
                await super().connect(*args, **kwargs)
            except TlsRefused:
                await self._close(Client.CLOSED, do_cbs=False)
                raise
            except nats.errors.NoServersError as error:
                # Some servers refused, others were unreachable: the refusal is the news.
                if self._refusal is not None:
                    raise self._refusal from error
                raise
            finally:
                self._first_connect = False

        def _setup_server_pool(self, connect_url: list[str]) -> None:  # nats-py passes a str too
            super()._setup_server_pool(connect_url)
            self._tls_urls = any(server.uri.scheme in ("tls", "wss") for server in self._server_pool)

        def _connect_command(self) -> bytes:
            if (self._tls_urls or "tls" in self.options) and not self._is_tls():
                raise self._refuse()
            return super()._connect_command()

        def _is_tls(self) -> bool:
            """nats-py's own decision to use TLS (_connect_to_server, _process_connect_init), and
            the socket agreeing."""
            assert self._current_server is not None
            scheme = self._current_server.uri.scheme
            promised = (
                self.options["tls_handshake_first"]
                or scheme == "wss"
                or (bool(self._server_info.get("tls_required")) and scheme != "ws")
            )
            if isinstance(self._transport, TcpTransport):
                writer = self._transport._io_writer
                return promised and writer is not None and writer.get_extra_info("ssl_object") is not None
            return bool(promised)

        def _refuse(self) -> TlsRefused:
            assert self._current_server is not None
            self._refusal = TlsRefused(host_port(self._current_server.uri))
            self._refused.add(self._refusal.server)
            if self._first_connect and all(host_port(server.uri) in self._refused for server in self._server_pool):
                # Every server refused: another round would refuse again (with
                # max_reconnect_attempts -1, forever), so nats-py is told to give up at once.
                self.options["allow_reconnect"] = False
            return self._refusal


def host_port(uri: ParseResult) -> str:
    """A server as host:port: never the URL's user or password."""
    host = str(uri.hostname)
    return f"[{host}]:{uri.port}" if ":" in host else f"{host}:{uri.port}"


async def connect_tls_or_nothing(servers: str | list[str] = "nats://localhost:4222", **options: Any) -> Client:
    """nats.connect (same arguments) with TlsOrNothingClient: a tls:// URL or a `tls` context means
    TLS or nothing, never the login in clear. Raises TlsRefused when a server did not offer TLS."""
    nc = TlsOrNothingClient()
    await nc.connect(servers, **options)
    return nc


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
    """A connection within `timeout` (TLS or nothing, see TlsOrNothingClient), or ConnectError naming
    the servers and the last error (which nats-py would otherwise print to stderr). `params` holds
    CONNECTION_ARGUMENT_SPEC's keys."""
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
            connect_tls_or_nothing(
                servers=servers, connect_timeout=timeout, max_reconnect_attempts=2, error_cb=note, **options
            ),
            timeout,
        )
    except TlsRefused as error:
        raise ConnectError(f"cannot connect to {', '.join(servers)}: {error}") from error
    except (TimeoutError, nats.errors.Error, OSError) as error:
        last = errors[-1] if errors else f"{type(error).__name__}: {error}"
        raise ConnectError(f"cannot connect to {', '.join(servers)} within {timeout:g} s ({last})") from error
