"""What TLS and bcrypt logins cost a client, printed (not asserted):  python -m benchmarks.security

Two single-node JetStream servers on loopback, started by this process from the same binary: one
plaintext and anonymous (the baseline), one configured as the cluster is (TLS with a certificate
from the nats_pki role, accounts, bcrypt cost-11 passwords). For each: connect + first JetStream
request (the login is checked there), and sequential publish-with-ack latency on a file stream.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nats.js.api import StorageType, StreamConfig

from tests.helpers import LAB_INVENTORY, NATS_SERVER, OFFLINE_PKI, REPO, load_filter_plugin, run_playbook
from tests.local_nats import free_port
from verify.client import connect_tls_or_nothing

CONNECTS = 20
PUBLISHES = 2000
PASSWORD = "benchmark-password-0123"


def _config(workdir: Path, port: int, secure: bool) -> str:
    base = f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{workdir}/store" }}\n'
    if not secure:
        return base
    digest = load_filter_plugin("nats_secrets").nats_bcrypt(PASSWORD, "bench/cim")
    return base + (
        f'tls {{ cert_file: "{OFFLINE_PKI}/nats-1.crt", key_file: "{OFFLINE_PKI}/nats-1.key", '
        f'ca_file: "{OFFLINE_PKI}/ca.crt" }}\n'
        f'accounts {{ APP: {{ jetstream: enabled, users: [ {{ user: "cim", password: "{digest}" }} ] }} }}\n'
    )


@contextmanager
def server(secure: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-security-", dir=REPO / "build"))
    port = free_port()
    (workdir / "nats.conf").write_text(_config(workdir, port, secure))
    process = subprocess.Popen([str(NATS_SERVER), "-c", str(workdir / "nats.conf")], stderr=subprocess.DEVNULL)
    login: dict[str, Any] = {}
    if secure:
        login = {
            "user": "cim",
            "password": PASSWORD,
            "tls": ssl.create_default_context(cafile=str(OFFLINE_PKI / "ca.crt")),
        }
    try:
        time.sleep(0.5)
        yield f"{'tls' if secure else 'nats'}://127.0.0.1:{port}", login
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(workdir)


async def figures(url: str, login: dict[str, Any]) -> dict[str, float]:
    connects = []
    for _ in range(CONNECTS):
        start = time.perf_counter()
        nc = await connect_tls_or_nothing(url, connect_timeout=5, **login)
        await nc.jetstream(timeout=5).account_info()
        connects.append(time.perf_counter() - start)
        await nc.close()
    nc = await connect_tls_or_nothing(url, connect_timeout=5, **login)
    js = nc.jetstream(timeout=5)
    await js.add_stream(StreamConfig(name="BENCH", subjects=["bench.>"], storage=StorageType.FILE))
    latencies = []
    start_all = time.perf_counter()
    for n in range(PUBLISHES):
        start = time.perf_counter()
        await js.publish(f"bench.{n % 16}", b"x" * 256)
        latencies.append(time.perf_counter() - start)
    elapsed = time.perf_counter() - start_all
    await nc.close()
    return {
        "connect_ms": statistics.median(connects) * 1000,
        "publish_ack_ms": statistics.median(latencies) * 1000,
        "publish_ack_p99_ms": sorted(latencies)[int(len(latencies) * 0.99)] * 1000,
        "acked_per_s": PUBLISHES / elapsed,
    }


def main() -> int:
    # asyncio's TLS transport logs a harmless line for every connection nats-py closes.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    issued = run_playbook(
        "certificates.yml", LAB_INVENTORY, "-e", "nats_pki_issue_certificates=true", "-e", f"nats_pki_dir={OFFLINE_PKI}"
    )
    if issued.returncode != 0:
        print(issued.stdout[-2000:], file=sys.stderr)
        return 1
    results = {}
    for name, secure in (("plaintext, anonymous (baseline)", False), ("TLS + bcrypt login (as deployed)", True)):
        with server(secure) as (url, login):
            results[name] = asyncio.run(figures(url, login))
    baseline, secured = results.values()
    print(f"{'':34} {'connect ms':>11} {'ack ms p50':>11} {'ack ms p99':>11} {'acked/s':>9}")
    for name, f in results.items():
        print(
            f"{name:34} {f['connect_ms']:11.1f} {f['publish_ack_ms']:11.3f} "
            f"{f['publish_ack_p99_ms']:11.3f} {f['acked_per_s']:9.0f}"
        )
    print(
        f"ratio secured/baseline: connect {secured['connect_ms'] / baseline['connect_ms']:.1f}x, "
        f"ack p50 {secured['publish_ack_ms'] / baseline['publish_ack_ms']:.2f}x, "
        f"acked/s {secured['acked_per_s'] / baseline['acked_per_s']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
