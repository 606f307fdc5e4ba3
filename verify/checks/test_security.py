"""The cluster refuses what it must refuse (plaintext, anonymous and wrong logins), serves
certificates that chain to the cluster's CA and are not about to expire, and the deploy's log
holds none of its secrets."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
import ssl
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import nats
import pytest

from verify import permissions
from verify.client import connect, connect_tls_or_nothing
from verify.inventory import Cluster, Node
from verify.plugin import RunState, client_urls, contact_nodes, fail_if_silent, monitor_json, note_silence

pytestmark = pytest.mark.security

SIZE_RE = re.compile(r"^([0-9]+)([KMGT]?)B?$")


def budget(state: RunState, most: float = 3.0) -> float:
    return min(most, max(0.5, state.remaining()))


def size_in_bytes(size: Any) -> int:
    """nats-server.conf sizes: 512MB, 48GB, 1T (binary units, as the server reads them)."""
    match = SIZE_RE.match(str(size).strip().upper())
    if not match:
        raise ValueError(f"not a size: {size!r}")
    exponent = " KMGT".index(match.group(2) or " ")
    return int(match.group(1)) * int(pow(1024, exponent))


class Silent(Exception):
    """The address did not answer a connection attempt in time."""


async def _read_info(host: str, port: int, seconds: float) -> tuple[dict[str, Any], Any, Any]:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), seconds)
    except TimeoutError:
        raise Silent(f"{host}:{port} did not answer within {seconds:.0f} s") from None
    try:
        line = await asyncio.wait_for(reader.readline(), seconds)
    except TimeoutError:
        writer.close()
        raise Silent(f"{host}:{port} took the connection but sent no INFO within {seconds:.0f} s") from None
    if not line.startswith(b"INFO "):
        writer.close()
        raise AssertionError(f"{host}:{port} did not greet with INFO: {line[:80]!r}")
    return json.loads(line[5:]), reader, writer


def _split(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


@pytest.mark.runbook("security")
def test_plaintext_client_refused(nats_node: Node, nats_cluster: Cluster, verify_state: RunState) -> None:
    """A client that logs in without TLS (with the right password) gets nothing back."""
    fail_if_silent(verify_state, nats_node)
    host, port = _split(nats_node.client_url)
    seconds = budget(verify_state)

    async def attempt() -> tuple[dict[str, Any], bytes]:
        try:
            info, reader, writer = await _read_info(host, port, seconds)
        except Silent as silence:
            note_silence(verify_state, nats_node, f"connecting to {host}:{port}")
            raise AssertionError(f"{nats_node.host}: {silence}") from None
        try:
            # The real password: only the missing TLS may be the reason for the refusal.
            app = nats_cluster.admin
            hello = {"verbose": False, "pedantic": False, "tls_required": False, "user": app.user, "pass": app.password}
            writer.write(b"CONNECT " + json.dumps(hello).encode() + b"\r\nPING\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(512), seconds)
        except (ConnectionError, TimeoutError):
            answer = b""
        finally:
            writer.close()
        return info, answer

    info, answer = asyncio.run(attempt())
    assert info.get("tls_required") is True, f"{nats_node.host}: the client port does not require TLS"
    assert b"PONG" not in answer and b"+OK" not in answer, (
        f"{nats_node.host}: a plaintext client was answered: {answer[:120]!r}"
    )


@pytest.mark.runbook("security")
def test_route_port_requires_mutual_tls(nats_node: Node, nats_cluster: Cluster, verify_state: RunState) -> None:
    """A peer without a certificate from the cluster's CA learns nothing: in plaintext it gets no
    greeting, and over TLS the server asks for its certificate and ends the handshake."""
    fail_if_silent(verify_state, nats_node)
    host = str(nats_node["nats_server_cluster_host"]).replace("0.0.0.0", nats_node.address)
    port = int(nats_node["nats_server_cluster_port"])
    seconds = budget(verify_state, 2.0)

    async def attempt(context: ssl.SSLContext | None, wait: float) -> tuple[bytes, str]:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=context, server_hostname=host if context else None), seconds
            )
        except TimeoutError:
            note_silence(verify_state, nats_node, f"connecting to {host}:{port}")
            raise AssertionError(f"{nats_node.host}: {host}:{port} did not answer within {seconds:.0f} s") from None
        except OSError as error:
            return b"", f"{type(error).__name__}: {error}"
        try:
            return await asyncio.wait_for(reader.read(512), wait), ""
        except (OSError, TimeoutError) as error:
            return b"", f"{type(error).__name__}: {error}"
        finally:
            writer.close()

    # A server that greets plaintext peers does so at once; half a second of silence is a refusal.
    plain, _ = asyncio.run(attempt(None, 0.5))
    assert not plain.startswith(b"INFO"), f"{nats_node.host}: the route port greets a plaintext peer: {plain[:80]!r}"
    greeting, error = asyncio.run(attempt(nats_cluster.tls_context(), seconds))
    assert not greeting.startswith(b"INFO"), f"{nats_node.host}: the route port admits a peer without a certificate"
    assert "certificate required" in error, f"{nats_node.host}: the route port did not ask for a certificate ({error})"


async def _login_attempt(cluster: Cluster, state: RunState, node: Node, login: dict[str, Any]) -> str:
    """The error a login to `node` gets, '' if it got in; Silent if the node did not answer.
    One connection, within the run's time: nats-py's own server loop, told not to reconnect,
    would retry a refused address without end."""
    seconds = budget(state, 2.0)
    errors: list[str] = []

    async def note(error: Exception) -> None:
        errors.append(f"{type(error).__name__}: {error}".strip())

    try:
        nc = await asyncio.wait_for(
            connect_tls_or_nothing(
                servers=[node.client_url],
                connect_timeout=seconds,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                error_cb=note,
                tls=cluster.tls_context(),
                **login,
            ),
            seconds + 0.2,
        )
    except TimeoutError:
        note_silence(state, node, f"connecting to {node.client_url}")
        raise Silent(f"{node.host}: no answer within {seconds:.1f} s") from None
    except nats.errors.NoServersError:
        raise Silent(f"{node.host}: {errors[-1] if errors else 'no answer'}") from None
    except (nats.errors.Error, OSError) as error:
        return f"{type(error).__name__}: {error}"
    await nc.close()
    return ""


async def _refusal(cluster: Cluster, state: RunState, **login: Any) -> str:
    """The error a login attempt gets from the first node that answers, or '' if that node let it
    in; fails when none answers."""
    silent = []
    for node in contact_nodes(state, cluster):
        try:
            return await _login_attempt(cluster, state, node, login)
        except Silent as silence:
            silent.append(str(silence))
    pytest.fail("no node answered a login attempt: " + "; ".join(silent), pytrace=False)


@pytest.mark.runbook("security")
def test_anonymous_client_refused(nats_cluster: Cluster, verify_state: RunState) -> None:
    refusal = asyncio.run(_refusal(nats_cluster, verify_state))
    assert refusal, "a client without user or password was let in"
    assert "Authorization Violation" in refusal, f"refused, but not for the login: {refusal}"


@pytest.mark.runbook("security")
def test_wrong_password_refused(nats_cluster: Cluster, verify_state: RunState) -> None:
    wrong = nats_cluster.admin.password + "-wrong"
    refusal = asyncio.run(_refusal(nats_cluster, verify_state, user=nats_cluster.admin.user, password=wrong))
    assert refusal, f"{nats_cluster.admin.user} was let in with a wrong password"
    assert "Authorization Violation" in refusal, f"refused, but not for the login: {refusal}"


@pytest.mark.runbook("cluster")
def test_application_user_has_jetstream_with_its_limits(nats_cluster: Cluster, verify_state: RunState) -> None:
    async def limits() -> Any:
        nc = await connect(client_urls(verify_state, nats_cluster), verify_state, login=nats_cluster.login())
        try:
            return (await nc.jetstream(timeout=2).account_info()).limits
        finally:
            await nc.close()

    got = asyncio.run(asyncio.wait_for(limits(), budget(verify_state, 5.0)))
    wanted = nats_cluster.setting("nats_server_app_jetstream_limits")
    expected = {
        "max_memory": size_in_bytes(wanted["max_memory"]) if "max_memory" in wanted else got.max_memory,
        "max_storage": size_in_bytes(wanted["max_file"]) if "max_file" in wanted else got.max_storage,
        "max_streams": int(wanted.get("max_streams", got.max_streams)),
        "max_consumers": int(wanted.get("max_consumers", got.max_consumers)),
    }
    actual = {k: getattr(got, k) for k in expected}
    assert actual == expected, f"account {nats_cluster.setting('nats_server_app_account')} limits: {actual}"


def _declared_consumers(cluster: Cluster, stream: str) -> list[str]:
    for declared in cluster.nodes[0].settings.get("jetstream_streams_declared") or []:
        if declared.get("name") == stream:
            return [str(c["name"]) for c in declared.get("consumers") or []]
    return []


@pytest.mark.runbook("security")
def test_applications_may_use_the_store_but_not_destroy_it(nats_cluster: Cluster, verify_state: RunState) -> None:
    """Each declared application, logged in as itself: what the CIM's client does works (stream
    info, its own consumers, fetch, ack, direct get, append, atomic batch), and stream create,
    update, delete and purge, message delete and deleting a declared consumer are refused. The
    probes store and delete nothing (verify/permissions.py)."""
    clients = nats_cluster.nodes[0].settings.get("nats_server_app_clients") or []
    problems = []
    for client in clients:
        login = nats_cluster.login(nats_cluster.clients[client["name"]])
        for stream in client.get("streams") or []:
            findings = permissions.run_check(
                client_urls(verify_state, nats_cluster),
                login,
                stream,
                client.get("publish") or [],
                _declared_consumers(nats_cluster, stream),
                seconds=budget(verify_state, 1.0),
                deadline=budget(verify_state, 6.0),
            )
            problems += [f"{client['name']} on {stream} is refused: {p}" for p in findings.wrongly_refused]
            problems += [f"{client['name']} on {stream} may: {p}" for p in findings.wrongly_allowed]
    assert not problems, "; ".join(problems)


@pytest.mark.runbook("security")
def test_system_user_pings_every_server(nats_cluster: Cluster, verify_state: RunState) -> None:
    """The `nats server list` view: every server answers the system account's ping."""
    expected = {n.server_name for n in nats_cluster.nodes}
    seconds = budget(verify_state, 2.0)

    async def ping() -> dict[str, Any]:
        nc = await connect(
            client_urls(verify_state, nats_cluster), verify_state, login=nats_cluster.login(nats_cluster.system)
        )
        answers: dict[str, Any] = {}
        complete = asyncio.Event()

        async def collect(message: Any) -> None:
            reply = json.loads(message.data)
            answers[reply["server"]["name"]] = {"version": reply["server"].get("ver", "?")} | reply.get("statsz", {})
            if set(answers) >= expected:
                complete.set()

        try:
            inbox = nc.new_inbox()
            await nc.subscribe(inbox, cb=collect)
            await nc.publish("$SYS.REQ.SERVER.PING", b"", reply=inbox)
            await asyncio.wait_for(complete.wait(), seconds)
        except TimeoutError:
            pass
        finally:
            await nc.close()
        return answers

    answers = asyncio.run(ping())
    missing = expected - set(answers)
    assert not missing, f"no answer to $SYS.REQ.SERVER.PING from {', '.join(sorted(missing))}"
    # As `nats server list` shows them: version, connections, memory.
    for name, stats in sorted(answers.items()):
        verify_state.report.append(
            f"server {name}: v{stats['version']}, {stats.get('connections', '?')} connections, "
            f"{stats.get('mem', 0) / 2**20:.0f} MiB, {stats.get('active_servers', '?')} servers seen"
        )


def _not_after(when: str) -> datetime:
    return datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _check_served_certificate(state: RunState, node: Node, ca_file: Path, seconds: float) -> None:
    """The certificate the monitor port serves, checked against the cluster's CA and the node's
    address (ssl does both)."""
    host, port = _split(node.monitor_url)
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with urllib.request.urlopen(
            f"{node.monitor_url}/healthz?js-server-only=true", timeout=seconds, context=context
        ):
            pass
    except urllib.error.HTTPError:
        pass  # an answer: the handshake (the chain and the name) succeeded
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            note_silence(state, node, f"connecting to {node.monitor_url}")
            pytest.fail(f"{node.host}: {host}:{port} did not answer within {seconds:.0f} s", pytrace=False)
        pytest.fail(f"{node.host}: the certificate on {host}:{port} does not check out: {error.reason}", pytrace=False)


@pytest.mark.runbook("certificates")
def test_certificates_chain_to_the_ca_and_are_not_expiring(
    nats_node: Node, nats_cluster: Cluster, verify_state: RunState, request: pytest.FixtureRequest
) -> None:
    fail_if_silent(verify_state, nats_node)
    _check_served_certificate(verify_state, nats_node, nats_cluster.ca_file, budget(verify_state))
    varz = monitor_json(verify_state, nats_node, "/varz")
    loaded = {"client": varz.get("tls_cert_not_after"), "route": (varz.get("cluster") or {}).get("tls_cert_not_after")}
    assert all(loaded.values()), f"{nats_node.host}: the server reports no certificate for {loaded}"
    warn_days = int(request.config.getoption("--cert-warn-days"))
    now = datetime.now(UTC)
    for use, when in loaded.items():
        days = (_not_after(str(when)) - now).total_seconds() / 86400
        assert days > 0, f"{nats_node.host}: the {use} certificate expired on {when}"
        if days < warn_days:
            verify_state.warnings.append(
                f"{nats_node.host}: the {use} certificate expires in {days:.0f} days ({when}); renew it"
            )


@pytest.mark.runbook("certificates")
def test_certificate_lets_clients_fail_over(nats_node: Node, nats_cluster: Cluster, verify_state: RunState) -> None:
    """The node's certificate is valid for every member's address and name. A client given one
    member learns the others as bare IPs and checks their certificates against what it was given:
    nats-py (like the Go client) the address, nats.js the name (it checks a bare IP against
    "localhost", so its users connect by name: docs/clients.md). Without both it cannot fail over."""
    fail_if_silent(verify_state, nats_node)
    host, port = _split(nats_node.monitor_url)
    # The chain is checked as always; the names are compared below, all in one handshake.
    context = nats_cluster.tls_context()
    context.check_hostname = False
    try:
        with (
            socket.create_connection((host, port), timeout=budget(verify_state, 2.0)) as raw,
            context.wrap_socket(raw) as tls,
        ):
            served = tls.getpeercert() or {}
    except TimeoutError:
        note_silence(verify_state, nats_node, f"connecting to {host}:{port}")
        pytest.fail(f"{nats_node.host}: {host}:{port} did not answer", pytrace=False)
    sans = cast(tuple[tuple[str, str], ...], served.get("subjectAltName", ()))
    named = {ipaddress.ip_address(value.strip()) for kind, value in sans if kind == "IP Address"}
    names = {value.strip().lower() for kind, value in sans if kind == "DNS"}
    missing = [f"{m.address} ({m.host})" for m in nats_cluster.nodes if ipaddress.ip_address(m.address) not in named]
    missing += [f"the name {m.host}" for m in nats_cluster.nodes if m.host.lower() not in names]
    assert not missing, (
        f"{nats_node.host}: its certificate is not valid for {', '.join(missing)}: a client given that "
        f"address or name cannot fail over to {nats_node.host}"
    )


@pytest.mark.runbook("security")
def test_deploy_log_holds_no_secret(nats_cluster: Cluster, request: pytest.FixtureRequest) -> None:
    logs = [Path(p) for p in request.config.getoption("--deploy-log")]
    if not logs:
        pytest.skip("no --deploy-log given")
    assert nats_cluster.secrets, "the inventory gave no secrets to look for"
    found = []
    for log in logs:
        text = log.read_text(errors="replace")
        # Whitespace and escaped newlines out: a key wrapped or quoted by a callback still matches.
        flat = re.sub(r"(\s|\\n)+", "", text)
        for name, secret in nats_cluster.secrets.items():
            if "PRIVATE KEY" in secret:
                # The whole body: pieces of it could match the public key, which may be logged.
                body = "".join(line for line in secret.splitlines() if "-----" not in line)
                leaked = re.sub(r"\s+", "", body) in flat
            else:
                leaked = secret in text
            if leaked:
                found.append(f"{name} in {log}")
    assert not found, "secrets in the log: " + "; ".join(found)
