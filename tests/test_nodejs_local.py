"""nats.js on Node (clients/node/cim-check.mjs) against real nats-servers on loopback with TLS, a
private CA and passwords, certificate verification always on.

What it proves about `@nats-io/transport-node` (clients/node/README.md has the source lines):
- a server given by IP is checked against the name "localhost", never against its IP: a certificate
  with the IP SAN and another name fails, one with only DNS:localhost passes;
- a server given by name is checked against that name (its IP SANs do not help);
- `tls.servername` replaces the name for every server;
- servers learned on the first INFO (bare IPs by default) are checked against the name of the seed
  the client connected through; servers learned from a later INFO get no name at all ("localhost"),
  unless they were advertised by name (`client_advertise`).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import queue
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.helpers import NATS_SERVER, REPO, missing_in_ci_fails
from tests.local_nats import free_port
from verify import monitor
from verify.client import connect_tls_or_nothing

pytestmark = pytest.mark.slow

CLIENT_DIR = REPO / "clients" / "node"
STREAM = "INFRASTRUCTURE_EVENTS"
USER, PASSWORD = "cim", "cim-local-test-password"
ALTNAMES_LOCALHOST = "Host: localhost. is not in the cert's altnames"
# Each node run is bounded twice: the script's own limit and the subprocess timeout above it.
CHECK_LIMIT_MS = 12000
NODE_TIMEOUT = 30.0
# Names for the cluster members, resolved to 127.0.0.1 inside the Node process only (FAKE_DNS):
# the machine's resolver knows none of them, so every name the client uses is one we chose.
MEMBERS = ("nats-1.cim.test", "nats-2.cim.test", "nats-3.cim.test")
# One name every member's certificate may carry besides its own, for clients that set it as
# tls.servername and connect by IP.
SHARED_NAME = "nats.cim.test"


# --- the Node client --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def node_client() -> Path:
    """clients/node with its node_modules (`npm ci` when missing or older than the lock file)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        missing_in_ci_fails("node and npm are needed for the nats.js tests")
    # The rule of clients/node.mk: npm ci writes node_modules/.package-lock.json.
    installed = CLIENT_DIR / "node_modules" / ".package-lock.json"
    newest = max((CLIENT_DIR / name).stat().st_mtime for name in ("package.json", "package-lock.json"))
    if not installed.exists() or installed.stat().st_mtime < newest:
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=CLIENT_DIR,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, f"npm ci failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        installed.touch()
    return CLIENT_DIR


@dataclass
class Check:
    code: int
    report: dict[str, Any]
    output: str


def run_check(env: dict[str, str], *args: str, preload: Path | None = None) -> Check:
    command = ["node", *(["--require", str(preload)] if preload else []), "cim-check.mjs", *args]
    result = subprocess.run(
        command,
        cwd=CLIENT_DIR,
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env},
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, f"cim-check.mjs must print one JSON line:\n{result.stdout}\n{result.stderr}"
    return Check(result.returncode, json.loads(lines[0]), result.stdout + result.stderr)


def check_env(url: str, ca: Path, **extra: str) -> dict[str, str]:
    return {
        "NATS_URL": url,
        "NATS_USER": USER,
        "NATS_PASSWORD": PASSWORD,
        "NATS_CA": str(ca),
        "NATS_CHECK_TIMEOUT_MS": str(CHECK_LIMIT_MS),
        **extra,
    }


# --- certificates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Authority:
    cert_path: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=2)
    )


def make_ca(directory: Path, common_name: str = "cim-nats-infra test CA") -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    cert = _validity(builder).sign(key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ca.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Authority(path, cert, key)


def issue(ca: Authority, directory: Path, stem: str, dns: tuple[str, ...], ips: tuple[str, ...]) -> tuple[Path, Path]:
    """A server certificate for exactly these DNS and IP SANs; returns (cert, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(stem))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    cert = _validity(builder).sign(ca.key, hashes.SHA256())
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


# --- servers ----------------------------------------------------------------------------------


@dataclass
class Server:
    """One nats-server on loopback: TLS on the client port, a password user in a JetStream account;
    plain routes on loopback when it is a cluster member."""

    workdir: Path
    name: str
    cert: Path
    key: Path
    port: int = field(default_factory=free_port)
    http: int = field(default_factory=free_port)
    route: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log: BinaryIO | None = None

    def config(self, peers: list[Server], advertise: str | None, jetstream: bool) -> str:
        lines = [
            f'server_name: "{self.name}"',
            f'listen: "127.0.0.1:{self.port}"',
            f'http: "127.0.0.1:{self.http}"',
            f'tls {{ cert_file: "{self.cert}", key_file: "{self.key}", timeout: 2 }}',
            f'accounts {{ APP {{ jetstream: enabled, users: [ {{ user: "{USER}", password: "{PASSWORD}" }} ] }} }}',
        ]
        if jetstream:
            lines.append(
                f'jetstream {{ store_dir: "{self.workdir}/store", max_memory_store: 64MB, max_file_store: 1GB }}'
            )
        if advertise:
            lines.append(f'client_advertise: "{advertise}"')
        if peers:
            routes = ", ".join(f'"nats-route://127.0.0.1:{p.route}"' for p in peers if p is not self)
            lines.append(f'cluster {{ name: "cim-test", listen: "127.0.0.1:{self.route}", routes: [ {routes} ] }}')
        return "\n".join(lines) + "\n"

    def start(self, peers: list[Server] | None = None, advertise: str | None = None, jetstream: bool = True) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "nats.conf"
        config.write_text(self.config(peers or [], advertise, jetstream))
        self.log = (self.workdir / "server.log").open("ab")
        self.process = subprocess.Popen([str(NATS_SERVER), "-c", str(config)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited: {(self.workdir / 'server.log').read_text()[-2000:]}")
            try:
                if monitor.healthz(f"http://127.0.0.1:{self.http}", timeout=0.5).status == 200:
                    return
            except monitor.MonitorUnreachable:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not become healthy in 10 s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        if self.log:
            self.log.close()
            self.log = None

    def connect_urls(self) -> list[str]:
        return list(monitor.get_json(f"http://127.0.0.1:{self.http}", "/varz", timeout=1).get("connect_urls") or [])


@contextmanager
def running(server: Server, **start: Any) -> Iterator[Server]:
    try:
        server.start(**start)
        yield server
    finally:
        server.stop()


def create_stream(host: str, port: int, ca: Path) -> None:
    """The CIM's stream, made with nats-py (which checks a name URL by name, an IP URL by IP)."""

    async def create() -> None:
        context = ssl.create_default_context(cafile=str(ca))
        nc = await connect_tls_or_nothing(
            f"tls://{host}:{port}",
            user=USER,
            password=PASSWORD,
            tls=context,
            connect_timeout=5,
            max_reconnect_attempts=0,
        )
        try:
            await nc.jetstream(timeout=10).add_stream(name=STREAM, subjects=["infrastructure.>"], storage="file")
        finally:
            await nc.close()

    asyncio.run(create())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One CA and the certificates the single-server tests swap in, plus a stranger CA."""
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory)
    paths = {"ca": ca.cert_path}
    variants: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
        # What the brief describes: both the name and the address.
        "name-and-ip": (("localhost",), ("127.0.0.1",)),
        # The lab's shape: the right IP, a name that is not "localhost".
        "ip-only": ((MEMBERS[0],), ("127.0.0.1",)),
        # No IP SAN at all: valid for tls://127.0.0.1 only if Node checks "localhost".
        "localhost-only": (("localhost",), ()),
    }
    for stem, (dns, ips) in variants.items():
        paths[f"{stem}.crt"], paths[f"{stem}.key"] = issue(ca, directory, stem, dns, ips)
    stranger = make_ca(directory / "stranger", "not our CA")
    paths["stranger.crt"], paths["stranger.key"] = issue(
        stranger, directory, "stranger", ("localhost",), ("127.0.0.1",)
    )
    return paths


@pytest.fixture
def single(pki: dict[str, Path], tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    """A single JetStream server presenting the certificate named by the test's parameter, with the
    CIM stream made."""
    stem = request.param
    server = Server(tmp_path / "server", "solo", pki[f"{stem}.crt"], pki[f"{stem}.key"])
    with running(server):
        if stem != "stranger":
            create_stream("127.0.0.1" if stem == "ip-only" else "localhost", server.port, pki["ca"])
        yield server


# --- one server, one certificate: which name is checked ---------------------------------------


@pytest.mark.parametrize("single", ["name-and-ip"], indirect=True)
def test_name_url_passes_the_whole_check(node_client: Path, single: Server, pki: dict[str, Path]) -> None:
    check = run_check(check_env(f"tls://localhost:{single.port}", pki["ca"]))
    assert check.code == 0, check.output
    report = check.report
    assert report["ok"] is True and report["error"] is None, report
    assert report["read_back"] is True and isinstance(report["seq"], int) and report["seq"] >= 1, report
    assert report["stream"] == STREAM and report["connected_url"] == f"localhost:{single.port}", report
    assert report["server"]["server_name"] == "solo" and report["server"]["tls_required"] is True, report


@pytest.mark.parametrize("single", ["name-and-ip"], indirect=True)
def test_connect_only_prints_the_server(node_client: Path, single: Server, pki: dict[str, Path]) -> None:
    check = run_check(check_env(f"tls://localhost:{single.port}", pki["ca"]), "--connect-only")
    assert check.code == 0 and check.report["ok"] is True, check.output
    assert check.report["server"]["version"] and check.report["seq"] is None, check.report


@pytest.mark.parametrize("single", ["name-and-ip"], indirect=True)
def test_ip_url_passes_only_because_the_certificate_says_localhost(
    node_client: Path, single: Server, pki: dict[str, Path]
) -> None:
    """The brief's expectation (an IP URL fails against name+IP certificate) does not hold here:
    Node checks "localhost", which this certificate happens to carry. The next two tests tell
    the two readings apart."""
    check = run_check(check_env(f"tls://127.0.0.1:{single.port}", pki["ca"]))
    assert check.code == 0 and check.report["ok"] is True, check.output


@pytest.mark.parametrize("single", ["ip-only"], indirect=True)
def test_ip_url_is_checked_against_localhost_not_the_ip(
    node_client: Path, single: Server, pki: dict[str, Path]
) -> None:
    """The lab's failure: the certificate has the right IP SAN, the IP URL still fails by name."""
    check = run_check(check_env(f"tls://127.0.0.1:{single.port}", pki["ca"]))
    assert check.code == 1 and check.report["ok"] is False, check.output
    assert ALTNAMES_LOCALHOST in check.report["error"], check.report
    assert "IP Address:127.0.0.1" in check.report["error"], check.report


@pytest.mark.parametrize("single", ["localhost-only"], indirect=True)
def test_ip_url_never_checks_the_ip(node_client: Path, single: Server, pki: dict[str, Path]) -> None:
    """No IP SAN at all, and tls://127.0.0.1 passes: the address is not what is verified."""
    check = run_check(check_env(f"tls://127.0.0.1:{single.port}", pki["ca"]), "--connect-only")
    assert check.code == 0 and check.report["ok"] is True, check.output


@pytest.mark.parametrize("single", ["ip-only"], indirect=True)
def test_name_url_fails_when_the_certificate_lacks_the_name(
    node_client: Path, single: Server, pki: dict[str, Path]
) -> None:
    """The right IP SAN does not rescue a name URL: the name must be in the certificate."""
    check = run_check(check_env(f"tls://localhost:{single.port}", pki["ca"]), "--connect-only")
    assert check.code == 1 and ALTNAMES_LOCALHOST in (check.report["error"] or ""), check.output


@pytest.mark.parametrize("single", ["ip-only"], indirect=True)
def test_servername_overrides_the_name_for_ip_urls(node_client: Path, single: Server, pki: dict[str, Path]) -> None:
    """NATS_TLS_SERVERNAME (tls.servername) is the name checked, with verification on: the
    certificate's own name passes, another name fails."""
    url = f"tls://127.0.0.1:{single.port}"
    good = run_check(check_env(url, pki["ca"], NATS_TLS_SERVERNAME=MEMBERS[0]), "--connect-only")
    assert good.code == 0 and good.report["ok"] is True, good.output
    bad = run_check(check_env(url, pki["ca"], NATS_TLS_SERVERNAME=MEMBERS[1]), "--connect-only")
    assert bad.code == 1 and f"Host: {MEMBERS[1]}. is not in the cert's altnames" in bad.report["error"], bad.output


@pytest.mark.parametrize("single", ["stranger"], indirect=True)
def test_a_certificate_from_another_ca_is_refused(node_client: Path, single: Server, pki: dict[str, Path]) -> None:
    """Verification is on: right names, wrong issuer, refused."""
    check = run_check(check_env(f"tls://localhost:{single.port}", pki["ca"]), "--connect-only")
    assert check.code == 1 and check.report["ok"] is False, check.output
    assert "certificate" in check.report["error"].lower(), check.report


def test_a_silent_server_is_given_up_on_in_time(node_client: Path, pki: dict[str, Path]) -> None:
    """A port that accepts and never speaks: the connect timeout (a third of the overall limit, at
    least 1 s) fails it; with an overall limit below that, the hard limit does. One JSON line each."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"tls://localhost:{listener.getsockname()[1]}"
        start = time.monotonic()
        slow = run_check(check_env(url, pki["ca"], NATS_CHECK_TIMEOUT_MS="3000"))
        elapsed = time.monotonic() - start
        hard = run_check(check_env(url, pki["ca"], NATS_CHECK_TIMEOUT_MS="400"))
    assert slow.code == 1 and slow.report["error"] == "connect: timeout", slow.output
    assert elapsed < 3, elapsed
    assert hard.code == 2 and hard.report["error"] == "timed out after 400 ms during connect", hard.output


# --- a 3-member cluster: which name is checked for the servers the client learns --------------

FAKE_DNS = """\
// Test only: resolve the test's member names to loopback inside this Node process.
const dns = require("node:dns");
const hosts = JSON.parse(process.env.FAKE_HOSTS || "{}");
const original = dns.lookup;
dns.lookup = function lookup(host, options, callback) {
  if (typeof options === "function") { callback = options; options = {}; }
  if (typeof options === "number") options = { family: options };
  const address = hosts[host];
  if (!address) return original.call(dns, host, options, callback);
  if (options && options.all) return process.nextTick(callback, null, [{ address, family: 4 }]);
  return process.nextTick(callback, null, address, 4);
};
"""

# A long-running nats.js client: one JSON line per event, the client's server list (with the TLS
# name it will verify each against) on every change; `rtt` after each reconnect proves it works.
PROBE = """\
import { createRequire } from "node:module";
const require = createRequire(process.env.CLIENT_DIR + "/package.json");
const { connect } = require("@nats-io/transport-node");
const out = (o) => process.stdout.write(JSON.stringify(o) + "\\n");
// The transport keeps its dial errors to itself: report each TLS failure and the name it checked.
const tls = require("node:tls");
const tlsConnect = tls.connect;
tls.connect = function (...args) {
  const options = args.find((a) => a && typeof a === "object") || {};
  const socket = tlsConnect.apply(this, args);
  socket.on("error", (e) => out({ event: "tls_error", servername: options.servername ?? null, error: e.message }));
  return socket;
};
const servers = () => nc.protocol.servers.getServers().map((s) => ({
  listen: s.listen, gossiped: s.gossiped, tlsName: s.tlsName }));
setTimeout(() => { out({ event: "limit" }); process.exit(3); }, Number(process.env.PROBE_LIMIT_MS || 60000));
const nc = await connect({
  servers: process.env.NATS_URL.split(","), user: process.env.NATS_USER, pass: process.env.NATS_PASSWORD,
  tls: { caFile: process.env.NATS_CA, ...(process.env.NATS_TLS_SERVERNAME
    ? { servername: process.env.NATS_TLS_SERVERNAME } : {}) }, name: "failover-probe", timeout: 2000, noRandomize: true,
  maxReconnectAttempts: -1, reconnectTimeWait: 250, reconnectJitter: 0, reconnectJitterTLS: 0,
});
out({ event: "connected", server_name: nc.info.server_name, url: nc.getServer(), servers: servers() });
for await (const s of nc.status()) {
  const line = { event: s.type, server_name: nc.info?.server_name, url: nc.getServer(), servers: servers() };
  if (s.type === "reconnect") {
    try { await nc.rtt(); line.rtt = true; } catch (e) { line.rtt = String(e); }
  }
  if (s.error) line.error = String(s.error);
  out(line);
}
"""


@dataclass
class Probe:
    process: subprocess.Popen[str]
    lines: queue.Queue[dict[str, Any]]
    seen: list[dict[str, Any]] = field(default_factory=list)

    def wait_for(
        self, event: str, seconds: float, where: Callable[[dict[str, Any]], bool] | None = None, **match: Any
    ) -> dict[str, Any] | None:
        """The first event of that type (with those fields, in a set when a set is given, and
        satisfying `where`) within `seconds`, else None."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if (
                line.get("event") == event
                and all((line.get(k) in v if isinstance(v, set) else line.get(k) == v) for k, v in match.items())
                and (where is None or where(line))
            ):
                return line
        return None


def tls_errors(client: Probe, text: str, servername: str) -> list[dict[str, Any]]:
    return [
        line
        for line in client.seen
        if line.get("event") == "tls_error" and text in line["error"] and line["servername"] == servername
    ]


@contextmanager
def probe(tmp_path: Path, url: str, ca: Path, servername: str | None = None) -> Iterator[Probe]:
    (tmp_path / "fake-dns.cjs").write_text(FAKE_DNS)
    (tmp_path / "probe.mjs").write_text(PROBE)
    env = check_env(url, ca) | {
        "PATH": os.environ["PATH"],
        "CLIENT_DIR": str(CLIENT_DIR),
        "FAKE_HOSTS": json.dumps(dict.fromkeys(MEMBERS, "127.0.0.1")),
        "PROBE_LIMIT_MS": "60000",
    }
    if servername:
        env["NATS_TLS_SERVERNAME"] = servername
    process = subprocess.Popen(
        ["node", "--require", str(tmp_path / "fake-dns.cjs"), str(tmp_path / "probe.mjs")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[dict[str, Any]] = queue.Queue()

    def read() -> None:
        assert process.stdout
        for raw in process.stdout:
            try:
                lines.put(json.loads(raw))
            except json.JSONDecodeError:
                lines.put({"event": "output", "text": raw.rstrip()})

    threading.Thread(target=read, daemon=True).start()
    try:
        yield Probe(process, lines)
    finally:
        process.kill()
        process.wait(5)


@dataclass(frozen=True)
class Design:
    """How names are laid out: what each certificate carries, what the servers advertise, and what
    the client is given."""

    certs_name_every_member: bool
    advertise_names: bool
    client_gets_every_name: bool
    # Every certificate also carries SHARED_NAME; the client connects by IP with it as servername.
    shared_name: bool = False

    @property
    def servername(self) -> str | None:
        return SHARED_NAME if self.shared_name else None

    @property
    def learned_tls_name(self) -> str:
        """The TLS name the client gives the IPs it learns on its first connect: the seed's name,
        none when the seed is an IP."""
        return "" if self.shared_name else MEMBERS[0]


def start_cluster(tmp_path: Path, design: Design) -> tuple[list[Server], Path, ExitStack]:
    ca = make_ca(tmp_path / "pki")
    servers = []
    for index, name in enumerate(MEMBERS):
        dns: tuple[str, ...] = MEMBERS if design.certs_name_every_member else (name,)
        dns += (SHARED_NAME,) if design.shared_name else ()
        cert, key = issue(ca, tmp_path / "pki", f"member-{index + 1}", dns, ("127.0.0.1",))
        servers.append(Server(tmp_path / f"member-{index + 1}", f"member-{index + 1}", cert, key))
    stack = ExitStack()
    for server, name in zip(servers, MEMBERS, strict=True):
        advertise = f"{name}:{server.port}" if design.advertise_names else None
        stack.enter_context(running(server, peers=servers, advertise=advertise, jetstream=False))
    wait_for_gossip(servers)
    return servers, ca.cert_path, stack


def wait_for_gossip(servers: list[Server], seconds: float = 15) -> None:
    """Until every running member reports every other running member's client URL."""
    deadline = time.monotonic() + seconds
    up = [s for s in servers if s.process]
    while True:
        counts = {s.name: len(s.connect_urls()) for s in up}
        if all(count >= len(up) - 1 for count in counts.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"cluster gossip incomplete after {seconds} s: {counts}")
        time.sleep(0.2)


def cluster_url(servers: list[Server], design: Design) -> str:
    chosen = servers if design.client_gets_every_name else servers[:1]
    hosts = ["127.0.0.1"] * len(MEMBERS) if design.shared_name else MEMBERS
    return ",".join(f"tls://{host}:{s.port}" for s, host in zip(chosen, hosts, strict=False))


FAILOVER = {
    # Certificates with their own name only, IPs advertised, one seed: the learned IPs are
    # checked against the seed's name, which the other members do not carry.
    "own-name/ip-advertised/one-seed": (Design(False, False, False), False),
    "every-name/ip-advertised/one-seed": (Design(True, False, False), True),
    "own-name/names-advertised/one-seed": (Design(False, True, False), True),
    "own-name/ip-advertised/every-seed": (Design(False, False, True), True),
    "own+shared-name/ip-advertised/ip-seed+servername": (Design(False, False, False, shared_name=True), True),
}


@pytest.mark.parametrize("case", list(FAILOVER), ids=list(FAILOVER))
def test_failover_after_the_seed_stops(node_client: Path, tmp_path: Path, case: str) -> None:
    design, survives = FAILOVER[case]
    servers, ca, stack = start_cluster(tmp_path, design)
    with stack, probe(tmp_path, cluster_url(servers, design), ca, design.servername) as client:
        connected = client.wait_for("connected", 15, server_name="member-1")
        assert connected, client.seen
        gossiped = [s for s in connected["servers"] if s["gossiped"]]
        assert len(gossiped) >= 2, connected
        if not design.advertise_names:
            # What the source says: learned IPs carry the seed's name as their TLS name.
            assert {s["tlsName"] for s in gossiped} == {design.learned_tls_name}, connected
        servers[0].stop()
        # A refusing client has made several passes over its list by 6 s (250 ms between them).
        moved = client.wait_for("reconnect", 12 if survives else 6, server_name={"member-2", "member-3"}, rtt=True)
        if survives:
            assert moved, client.seen
        else:
            assert moved is None, f"reconnected though no other member's certificate names {MEMBERS[0]}: {moved}"
            refused = f"Host: {MEMBERS[0]}. is not in the cert's altnames: DNS:{MEMBERS[1]}"
            assert tls_errors(client, refused, servername=MEMBERS[0]), client.seen
            # It keeps trying; its entry for the stopped seed stays, the others fail by name.
            assert client.process.poll() is None


RELEARNED = {
    # Every certificate names every member, one seed by name: the re-learned member is checked
    # against "localhost" and refused.
    "seed-name": (Design(True, False, False), False),
    # The same with one shared name set as tls.servername: that name is checked for every server.
    "shared-servername": (Design(False, False, False, shared_name=True), True),
    # Names advertised: the re-learned entry has no TLS name either, but it is a name, and a
    # name is resolved and checked as itself.
    "names-advertised": (Design(False, True, False), True),
}


@pytest.mark.parametrize("case", list(RELEARNED), ids=list(RELEARNED))
def test_a_member_learned_again_has_no_tls_name(node_client: Path, tmp_path: Path, case: str) -> None:
    """One seed: a member that leaves and comes back while the client stays
    connected is re-learned from an INFO update with no TLS name (Servers.update builds it
    without one; only the first INFO of a connection hands out the seed's name). With only that
    member left, the client reaches it when it was advertised by name or when tls.servername names
    every server, not when it was advertised by IP."""
    design, survives = RELEARNED[case]
    servers, ca, stack = start_cluster(tmp_path, design)
    with stack, probe(tmp_path, cluster_url(servers, design), ca, design.servername) as client:
        assert client.wait_for("connected", 15, server_name="member-1"), client.seen
        rejoining = servers[1]
        address = f"{MEMBERS[1] if design.advertise_names else '127.0.0.1'}:{rejoining.port}"

        def entries(line: dict[str, Any]) -> list[dict[str, Any]]:
            return [s for s in line["servers"] if s["listen"] == address]

        assert entries(client.seen[-1]) == [{"listen": address, "gossiped": True, "tlsName": design.learned_tls_name}]
        rejoining.stop()
        assert client.wait_for("update", 10, where=lambda line: not entries(line)), client.seen
        rejoining.start(
            peers=servers,
            advertise=f"{MEMBERS[1]}:{rejoining.port}" if design.advertise_names else None,
            jetstream=False,
        )
        wait_for_gossip(servers)
        update = client.wait_for("update", 10, where=lambda line: bool(entries(line)))
        assert update, client.seen
        assert entries(update) == [{"listen": address, "gossiped": True, "tlsName": ""}], update
        servers[2].stop()
        servers[0].stop()
        moved = client.wait_for("reconnect", 12 if survives else 6, server_name="member-2", rtt=True)
        if survives:
            assert moved, client.seen
        else:
            assert moved is None, f"reconnected to the re-learned member: {moved}"
            assert tls_errors(client, ALTNAMES_LOCALHOST, servername=""), client.seen
