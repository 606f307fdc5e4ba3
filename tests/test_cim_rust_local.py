"""The CIM's own NATS calls against a local nats-server that serves them the way the deployment does.

clients/cim-rust (`cim-contract`) makes the calls of TheCowboyAI/cim-infrastructure's event store
with async-nats 0.33, the version the CIM pins: get_or_create_stream, the read-before-append, one
new ephemeral pull consumer per read, fetch 10000 / 2 s. The server here is a single node on
loopback with the repo's test PKI (TLS required), a password login in an APP account with
JetStream, and INFRASTRUCTURE_EVENTS created beforehand as the deploy creates it (R1 here).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from tests.helpers import NATS_SERVER_VERSION, REPO
from tests.local_nats import running_server
from verify.client import connect_tls_or_nothing

pytestmark = pytest.mark.slow

STREAM = "INFRASTRUCTURE_EVENTS"
MANIFEST = REPO / "clients" / "cim-rust" / "Cargo.toml"
# Same default as clients/rust.mk: the build output lives outside the checkout.
TARGET_DIR = Path(os.environ.get("CARGO_TARGET_DIR") or Path.home() / ".cache" / "cim-nats-infra" / "cargo-target")
USER, PASSWORD = "cim", "local-cim-password"
# A second user holding only what the CIM's calls need: the permission list handed to the deploy.
LEAST_USER, LEAST_PASSWORD = "cim-least", "local-cim-least-password"
LEAST_PERMISSIONS = {
    "publish": {
        "allow": [
            "infrastructure.>",
            f"$JS.API.STREAM.INFO.{STREAM}",
            f"$JS.API.CONSUMER.CREATE.{STREAM}",
            f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.*",
            f"$JS.ACK.{STREAM}.>",
        ]
    },
    "subscribe": {"allow": ["_INBOX.>"]},
}


def cargo() -> str:
    found = shutil.which("cargo") or shutil.which(str(Path.home() / ".cargo" / "bin" / "cargo"))
    if found is None:
        pytest.fail("cargo not found (PATH, ~/.cargo/bin): clients/cim-rust needs Rust, see https://rustup.rs")
    return found


@pytest.fixture(scope="session")
def cim_contract() -> Path:
    """The binary, built the way `make rust-client` builds it (release, --locked)."""
    built = subprocess.run(
        [cargo(), "build", "--release", "--locked", "--manifest-path", str(MANIFEST)],
        env=os.environ | {"CARGO_TARGET_DIR": str(TARGET_DIR)},
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert built.returncode == 0, f"cargo build failed:\n{built.stderr[-4000:]}"
    binary = TARGET_DIR / "release" / "cim-contract"
    assert binary.is_file(), f"cargo reported success but {binary} is missing"
    return binary


@dataclass(frozen=True)
class LocalServer:
    url: str
    ca: Path


def server_config(workdir: Path, pki: Path, client: int, http: int) -> str:
    least = json.dumps(LEAST_PERMISSIONS)
    return f"""
server_name: local-cim
listen: "127.0.0.1:{client}"
http: "127.0.0.1:{http}"
tls {{
  cert_file: "{pki}/nats-1.crt"
  key_file: "{pki}/nats-1.key"
  ca_file: "{pki}/ca.crt"
  timeout: 2
}}
accounts {{
  APP: {{
    jetstream: {{ max_memory: 64MB, max_file: 10GB, max_streams: 64, max_consumers: 1024 }}
    users: [
      {{ user: "{USER}", password: "{PASSWORD}" }}
      {{ user: "{LEAST_USER}", password: "{LEAST_PASSWORD}", permissions: {least} }}
    ]
  }}
  SYS: {{ users: [ {{ user: "sys", password: "local-sys-password" }} ] }}
}}
system_account: SYS
jetstream {{ store_dir: "{workdir}/store", domain: "dgx-phx", max_memory_store: 64MB, max_file_store: 10GB }}
"""


async def create_stream(server: LocalServer) -> None:
    """INFRASTRUCTURE_EVENTS as the deploy makes it (jetstream_streams_declared), at R1."""
    tls = ssl.create_default_context(cafile=str(server.ca))
    client = await connect_tls_or_nothing(server.url, user=USER, password=PASSWORD, tls=tls, connect_timeout=3)
    try:
        await client.jetstream(timeout=3).add_stream(
            StreamConfig(
                name=STREAM,
                description="CIM infrastructure event store",
                subjects=["infrastructure.>"],
                storage=StorageType.FILE,
                retention=RetentionPolicy.LIMITS,
                num_replicas=1,
                max_bytes=10 * 1024**3,
                discard=DiscardPolicy.NEW,
                deny_delete=True,
                deny_purge=True,
                allow_direct=True,
                allow_atomic=True,
                duplicate_window=120.0,
            )
        )
    finally:
        await client.close()


@pytest.fixture(scope="session")
def local_server(offline_pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    workdir = tmp_path_factory.mktemp("cim-rust-nats")
    with running_server(workdir, lambda client, http: server_config(workdir, offline_pki, client, http)) as client:
        # The certificate names 127.0.0.1 (nats_pki puts loopback in every node's SANs).
        server = LocalServer(url=f"tls://127.0.0.1:{client}", ca=offline_pki / "ca.crt")
        asyncio.run(asyncio.wait_for(create_stream(server), 15))
        yield server


def run(
    binary: Path, server: LocalServer, *args: str, user: str = USER, password: str = PASSWORD, **env: str
) -> tuple[int, dict[str, Any]]:
    """Runs cim-contract; returns its exit code and its one JSON line."""
    result = subprocess.run(
        [str(binary), *args],
        env={
            "PATH": os.environ.get("PATH", ""),
            "NATS_URL": server.url,
            "NATS_USER": user,
            "NATS_PASSWORD": password,
            "NATS_CA": str(server.ca),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"expected one JSON line, got:\n{result.stdout}\n{result.stderr}"
    return result.returncode, json.loads(lines[0])


def steps(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step["step"]: step for step in report["steps"]}


def test_cim_reads_fail_on_the_servers_no_messages_status(cim_contract: Path, local_server: LocalServer) -> None:
    """Exactly as the CIM reads, its second append fails: nats-server (2.14.6 and 2.15.1 measured)
    ends a no_wait fetch that delivered messages with `404 No Messages`, async-nats 0.33 yields it as
    an error item, and the CIM's read turns that into a failed read. The first append passes only
    because an empty aggregate's fetch ends with 408 after the 2 s expiry. If this test starts
    failing, the client or server changed: update the CIM docs."""
    code, report = run(cim_contract, local_server, "contract")
    by_name = steps(report)
    assert code == 1 and report["ok"] is False, report
    assert by_name["append_1"]["ok"], report
    assert by_name["append_1"]["read_before_append_ms"] >= 1900, "an empty aggregate's read costs the 2 s expiry"
    assert not by_name["append_2"]["ok"], report
    assert "404" in by_name["append_2"]["error"] and "No Messages" in by_name["append_2"]["error"], report


def test_contract_appends_and_reads_back_three_events(cim_contract: Path, local_server: LocalServer) -> None:
    code, report = run(cim_contract, local_server, "contract", "--end-on-no-messages")
    assert code == 0 and report["ok"] is True, report
    assert [s["step"] for s in report["steps"]] == [
        "connect",
        "get_or_create_stream",
        "append_1",
        "append_2",
        "append_3",
        "read_events",
        "get_version",
        "stream_info",
    ]
    assert all(step["ok"] and step["error"] is None for step in report["steps"])
    assert report["events_read"] == 3 and report["version"] == 3
    assert steps(report)["read_events"]["sequences"] == [1, 2, 3]
    assert report["server"]["version"] == NATS_SERVER_VERSION and report["server"]["tls_required"] is True
    # get_or_create_stream used the deployed stream as it is (STREAM.INFO, no create, no 10058).
    stream = report["stream"]
    assert stream["name"] == STREAM and stream["created_by_this_run"] is False, stream
    assert stream["deny_delete"] is True and stream["discard"] == "new"
    assert {d["field"] for d in stream["differs_from_cim_config"]} == {"max_age_s"}, stream
    aggregate = report["aggregate_id"]
    assert steps(report)["append_1"]["subject"] == f"infrastructure.compute.{aggregate}.resourceregistered"


def test_read_load_twenty_reads_a_second(cim_contract: Path, local_server: LocalServer) -> None:
    code, report = run(
        cim_contract, local_server, "read-load", "--rate", "20", "--seconds", "5", "--end-on-no-messages"
    )
    print(
        f"read-load 20/s x 5 s: peak_consumers={report.get('peak_consumers')} "
        f"samples={report.get('consumer_samples')} latency_ms={report.get('latency_ms')} "
        f"achieved_rate={report.get('achieved_rate')}"
    )
    assert code == 0 and report["ok"] is True, report
    assert report["attempted"] == 100 and report["served"] == report["attempted"], report
    assert report["refused"]["count"] == 0 and report["incomplete"]["count"] == 0, report
    assert report["peak_consumers"] > 0, report
    assert report["events_per_read"] == {"expected": 3, "min": 3, "max": 3}
    assert report["achieved_rate"] >= 18, report


def test_contract_fails_clearly_on_a_wrong_password(cim_contract: Path, local_server: LocalServer) -> None:
    code, report = run(cim_contract, local_server, "contract", password="not-the-password")
    assert code == 1 and report["ok"] is False
    connect = steps(report)["connect"]
    assert not connect["ok"] and "authorization violation" in connect["error"], report
    assert list(steps(report)) == ["connect"], "nothing after a failed connect"


def test_least_privilege_user_suffices_and_is_enforced(cim_contract: Path, local_server: LocalServer) -> None:
    """The permission list in LEAST_PERMISSIONS is all the CIM's calls need; outside it they fail."""
    code, report = run(
        cim_contract, local_server, "contract", "--end-on-no-messages", user=LEAST_USER, password=LEAST_PASSWORD
    )
    assert code == 0 and report["ok"] is True, report
    code, report = run(
        cim_contract, local_server, "contract", user=LEAST_USER, password=LEAST_PASSWORD, NATS_STREAM="OTHER"
    )
    assert code == 1 and not steps(report)["get_or_create_stream"]["ok"], report
    assert any("permissions violation" in event for event in report["client_events"]), report
