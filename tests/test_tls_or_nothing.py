"""TLS or nothing (issue #12): a client given a CA or a tls:// URL never sends CONNECT, so never
the password, to a server that does not offer TLS. Real nats-servers on loopback, reached through
a proxy that records every byte the client sends; each client entry point is tried."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from nats.aio.client import Client

from tests.helpers import REPO, ansible_env, run_playbook
from tests.local_nats import free_port, running_server
from verify import client, load
from verify.inventory import Cluster, Login, Node
from verify.shared_code import module_util

USER = "tester"
PASSWORD = "tls-or-nothing-secret-7f3a"
api = module_util("jetstream_api")


class RecordingProxy:
    """A TCP proxy on loopback, in its own thread (so a playbook's module can use it too), that
    forwards to `target` and keeps every byte the clients sent."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._sent = bytearray()
        self._open = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        start = asyncio.start_server(self._relay, "127.0.0.1", 0)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(5)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def url(self, scheme: str = "nats") -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def sent(self) -> bytes:
        """Everything the clients sent, once each has hung up (nothing still in flight)."""
        deadline = time.monotonic() + 5
        while self._open and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not self._open, "a client is still connected to the proxy"
        return bytes(self._sent)

    async def _relay(self, from_client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            from_server, to_server = await asyncio.open_connection("127.0.0.1", self.target)
            back = asyncio.ensure_future(self._pipe(from_server, to_client, record=False))
            # Read the client to its end even if the server hung up: all it sends is on the wire.
            await self._pipe(from_client, to_server, record=True)
            back.cancel()
        finally:
            to_client.close()
            self._open -= 1

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bool) -> None:
        while chunk := await reader.read(65536):
            if record:
                self._sent += chunk
            if not writer.is_closing():
                writer.write(chunk)
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()


@contextmanager
def nats_server(workdir: Path, extra: str = "") -> Iterator[int]:
    """A nats-server with one user (USER/PASSWORD) and `extra` config; yields its client port."""

    def config(port: int, http: int) -> str:
        return (
            f'listen: "127.0.0.1:{port}"\nhttp: "127.0.0.1:{http}"\n'
            f'authorization {{ user: "{USER}", password: "{PASSWORD}" }}\n{extra}'
        )

    with running_server(workdir, config) as port:
        yield port


@pytest.fixture(scope="module")
def plain_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A server without TLS, but with a login: what a client must not hand the password to."""
    with nats_server(tmp_path_factory.mktemp("plain")) as port:
        yield port


@pytest.fixture(scope="module")
def tls_port(tmp_path_factory: pytest.TempPathFactory, offline_pki: Path) -> Iterator[int]:
    extra = f'tls {{ cert_file: "{offline_pki}/nats-1.crt", key_file: "{offline_pki}/nats-1.key" }}\n'
    with nats_server(tmp_path_factory.mktemp("tls"), extra) as port:
        yield port


@pytest.fixture
def ca_file(offline_pki: Path) -> Path:
    return offline_pki / "ca.crt"


def cluster_at(port: int, ca_file: Path) -> Cluster:
    """A one-node Cluster (its client URL is tls://, its login carries the CA), for verify.load."""
    node = Node("local", "127.0.0.1", {"nats_server_client_host": "127.0.0.1", "nats_server_client_port": port}, {})
    return Cluster(Path("local"), (node,), ca_file, Login(USER, PASSWORD), Login("sys", "unused"))


def refusal(proxy: RecordingProxy) -> str:
    return f"{proxy.address} does not offer TLS: the login is not sent in clear"


def assert_nothing_sent(proxy: RecordingProxy) -> None:
    sent = proxy.sent()
    assert b"CONNECT" not in sent and PASSWORD.encode() not in sent, sent[:200]


async def connected(make: Awaitable[Client]) -> bool:
    nc = await make
    await nc.flush(timeout=2)
    await nc.close()
    return True


# Each client entry point, given the servers and a CA file or None; each returns a connected client.
def module_connect(servers: list[str], ca_file: Path | None) -> Awaitable[Client]:
    params = {"servers": servers, "user": USER, "password": PASSWORD, "tls_ca_file": ca_file and str(ca_file)}
    result: Awaitable[Client] = api.connect(params, 3.0)
    return result


def login(ca_file: Path | None) -> dict[str, Any]:
    return {"user": USER, "password": PASSWORD} | (
        {"tls": ssl.create_default_context(cafile=ca_file)} if ca_file else {}
    )


def verify_connect(servers: list[str], ca_file: Path | None) -> Awaitable[Client]:
    return client.connect(servers, login=login(ca_file))


def guarded_connect(servers: list[str], ca_file: Path | None) -> Awaitable[Client]:
    return client.connect_tls_or_nothing(servers, connect_timeout=2, max_reconnect_attempts=1, **login(ca_file))


ENTRY_POINTS: dict[str, Callable[[list[str], Path | None], Awaitable[Client]]] = {
    "module_utils": module_connect,
    "verify": verify_connect,
    "guarded": guarded_connect,
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("asked_by", ["ca", "tls_url"])
def test_a_server_without_tls_gets_no_login(entry: str, asked_by: str, plain_port: int, ca_file: Path) -> None:
    with RecordingProxy(plain_port) as proxy:
        servers = [proxy.url("tls" if asked_by == "tls_url" else "nats")]
        with pytest.raises((api.ConnectError, nats.errors.Error), match="does not offer TLS") as raised:
            asyncio.run(connected(ENTRY_POINTS[entry](servers, ca_file if asked_by == "ca" else None)))
        assert refusal(proxy) in str(raised.value)
        assert_nothing_sent(proxy)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_without_tls_asked_for_the_proxy_passes_a_login(entry: str, plain_port: int) -> None:
    """The control: the same client, no CA, nats:// connects through the proxy, password in clear."""
    with RecordingProxy(plain_port) as proxy:
        assert asyncio.run(connected(ENTRY_POINTS[entry]([proxy.url()], None)))
        sent = proxy.sent()
    assert b"CONNECT" in sent and PASSWORD.encode() in sent


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_tls_server_gets_the_login_encrypted(entry: str, tls_port: int, ca_file: Path) -> None:
    with RecordingProxy(tls_port) as proxy:
        assert asyncio.run(connected(ENTRY_POINTS[entry]([proxy.url("tls")], ca_file)))
        assert_nothing_sent(proxy)


def test_load_connect_refuses_at_once_instead_of_retrying_forever(plain_port: int, ca_file: Path) -> None:
    """verify.load's client reconnects forever (max_reconnect_attempts -1): a refusal still ends it."""
    with RecordingProxy(plain_port) as proxy:
        start = time.monotonic()
        with pytest.raises(nats.errors.Error, match="does not offer TLS") as raised:
            asyncio.run(connected(load.connect(cluster_at(proxy.port, ca_file), "tls-test")))
        assert refusal(proxy) in str(raised.value) and time.monotonic() - start < 3
        assert_nothing_sent(proxy)


def test_load_connect_reaches_a_tls_server(tls_port: int, ca_file: Path) -> None:
    with RecordingProxy(tls_port) as proxy:
        assert asyncio.run(connected(load.connect(cluster_at(proxy.port, ca_file), "tls-test")))
        assert_nothing_sent(proxy)


def test_a_refusal_outlasts_an_unreachable_server(plain_port: int, ca_file: Path) -> None:
    """One server down, one without TLS: the caller hears the refusal, not "no servers available"."""
    with RecordingProxy(plain_port) as proxy:
        with pytest.raises(nats.errors.Error, match="does not offer TLS") as raised:
            asyncio.run(connected(verify_connect([f"nats://127.0.0.1:{free_port()}", proxy.url()], ca_file)))
        assert refusal(proxy) in str(raised.value)
        assert_nothing_sent(proxy)


def test_the_streams_module_refuses_a_server_without_tls(tmp_path: Path, plain_port: int, ca_file: Path) -> None:
    """End to end: jetstream_streams in a playbook, tls_ca_file given, the server without TLS."""
    with RecordingProxy(plain_port) as proxy:
        playbook = tmp_path / "streams.yml"
        task = {
            "servers": [proxy.url()],
            "user": USER,
            "password": PASSWORD,
            "tls_ca_file": str(ca_file),
            "streams": [{"name": "NEVER", "subjects": ["never.>"]}],
        }
        playbook.write_text(
            yaml.safe_dump(
                [
                    {
                        "name": "Streams on a server without TLS",
                        "hosts": "localhost",
                        "connection": "local",
                        "gather_facts": False,
                        "vars": {"ansible_python_interpreter": "{{ ansible_playbook_python }}"},
                        "tasks": [{"name": "Apply", "jetstream_streams": task}],
                    }
                ]
            )
        )
        result = run_playbook(
            str(playbook),
            "localhost,",
            json_output=True,
            env=ansible_env(ANSIBLE_LIBRARY=str(REPO / "plugins/modules")),
        )
        outcome = json.loads(result.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]
        assert result.returncode != 0 and outcome.get("failed"), result.stdout[-2000:]
        assert refusal(proxy) in outcome["msg"], outcome["msg"]
        assert_nothing_sent(proxy)
