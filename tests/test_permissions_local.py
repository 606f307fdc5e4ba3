"""The application users' permissions, as the deploy renders them, on a real nats-server on
loopback: the CIM's user can do what the CIM's client does and nothing that destroys the store;
the administrator (no restrictions) is reported as able to destroy it, so the check can fail."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator

import nats
import pytest

from tests.helpers import NATS_SERVER, load_filter_plugin
from tests.local_nats import free_port
from verify import permissions

secrets = load_filter_plugin("nats_secrets")
STREAM = "INFRASTRUCTURE_EVENTS"
CIM = {"name": "cim", "password": "cim-password-for-tests", "streams": [STREAM], "publish": ["infrastructure.>"]}
DECLARED = [{"name": STREAM, "consumers": [{"name": "projector"}]}]
ADMIN = {"user": "admin", "password": "admin-password-for-tests"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("perm")
    port = free_port()
    (cim,) = secrets.nats_app_client_users([CIM], "local", DECLARED)
    config = workdir / "nats.conf"
    config.write_text(
        f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{workdir}/store" }}\n'
        "accounts { APP: { jetstream: enabled, users: [\n"
        f'  {{ user: admin, password: "{ADMIN["password"]}" }}\n'
        f"  {{ user: cim, password: {json.dumps(cim['password'])}, permissions: {json.dumps(cim['permissions'])} }}\n"
        "] } }\n"
    )
    check = subprocess.run([str(NATS_SERVER), "-t", "-c", str(config)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    process = subprocess.Popen([str(NATS_SERVER), "-c", str(config)], stderr=subprocess.DEVNULL)
    url = f"nats://127.0.0.1:{port}"

    async def prepare() -> None:
        for _ in range(100):
            try:
                nc = await nats.connect(url, **ADMIN, connect_timeout=0.5, max_reconnect_attempts=0)
                break
            except (nats.errors.Error, OSError):
                await asyncio.sleep(0.05)
        js = nc.jetstream()
        stream = {"name": STREAM, "subjects": ["infrastructure.>"], "deny_delete": True, "deny_purge": True}
        await nc.request(f"$JS.API.STREAM.CREATE.{STREAM}", json.dumps(stream | {"allow_direct": True}).encode())
        await js.add_consumer(STREAM, durable_name="projector")
        await js.publish("infrastructure.compute.a.created", b"{}")
        await nc.close()

    try:
        asyncio.run(prepare())
        yield url
    finally:
        process.terminate()
        process.wait(10)


def stream_state(url: str) -> tuple[int, list[str]]:
    async def read() -> tuple[int, list[str]]:
        nc = await nats.connect(url, **ADMIN)
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        names = sorted(c.name for c in await js.consumers_info(STREAM))
        await nc.close()
        return info.state.messages, names

    return asyncio.run(read())


def test_the_cim_can_do_what_its_client_does_and_destroy_nothing(server: str) -> None:
    login = {"user": "cim", "password": CIM["password"]}
    started = time.monotonic()
    findings = permissions.run_check([server], login, STREAM, CIM["publish"], ["projector"])
    assert findings.ok, findings
    assert time.monotonic() - started < 3, "the probes waited for timeouts"
    # Nothing was stored by the probes, nothing deleted; the declared durable is still there.
    assert stream_state(server) == (1, ["projector"])


def test_an_unrestricted_user_is_reported(server: str) -> None:
    findings = permissions.run_check([server], ADMIN, STREAM, CIM["publish"], ["projector"])
    assert not findings.wrongly_refused, findings
    allowed = " ".join(findings.wrongly_allowed)
    for what in ("stream create", "stream update", "stream delete", "stream purge", "message delete", "projector"):
        assert what in allowed, findings
    # The harmless forms harmed nothing even though they were let through.
    assert stream_state(server) == (1, ["projector"])
