"""The NFS stand-in's write path (nats_lab/cimnfs.py): what a power loss keeps and drops.

An fsynced or closed write survives the loss of the host, an unsynced one is lost, and until
then the host reads its own writes. Two levels:

- the dirty overlay and the file system operations called directly, no kernel (runs anywhere);
- mount.cimnfs mounted for real with FUSE on a tmp dir of this machine, its daemon SIGKILLed
  as `nats-lab fault power-loss` does in the lab (needs root, /dev/fuse, Debian's libfuse2 and
  the fusepy package; skipped without them).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn, Protocol

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nats_lab import cimnfs, faults, hosts
from nats_lab.config import Host
from nats_lab.util import wait_gone
from tests.helpers import missing_in_ci_fails

HELPER = Path(cimnfs.__file__)
OPTIONS = "rw,hard,noatime,nfsvers=4.2,timeo=600,retrans=2,_netdev"
# Bytes with a prime period: a write that lands at the wrong offset shows.
PATTERN = bytes(range(251)) * 2000
KIB = 1024
MIB = 1024 * KIB


def pattern(seed: int, size: int) -> bytes:
    start = seed % 251
    return PATTERN[start : start + size]


# --- the overlay on its own ------------------------------------------------------------------
@given(st.lists(st.tuples(st.integers(0, 400), st.binary(max_size=80)), max_size=40), st.integers(0, 300))
def test_extents_behave_like_a_sparse_byte_array(writes: list[tuple[int, bytes]], window: int) -> None:
    extents = cimnfs.Extents()
    model: dict[int, int] = {}
    for offset, data in writes:
        before = extents.nbytes
        delta = extents.add(offset, data)
        model.update((offset + i, byte) for i, byte in enumerate(data))
        assert extents.nbytes == before + delta == len(model)
        # Sorted, disjoint and not touching: adjacent writes are merged into one range.
        ends = [s + len(d) for s, d in zip(extents.starts, extents.datas, strict=True)]
        assert all(end < nxt for end, nxt in zip(ends, extents.starts[1:], strict=False))
        assert all(extents.datas)
    assert extents.end == (max(model) + 1 if model else 0)
    assert bool(extents) == bool(model)
    for offset, size in ((0, 500), (window, 37)):
        buf = bytearray(b"\xee" * size)
        extents.overlay(offset, buf)
        expected = bytes(model.get(offset + i, 0xEE) for i in range(size))
        assert bytes(buf) == expected
    assert extents.clear() == len(model)
    assert not extents and extents.end == 0


def test_extents_append_in_place_and_overwrite_inside() -> None:
    extents = cimnfs.Extents()
    assert extents.add(0, b"abc") == 3
    assert extents.add(3, b"def") == 3  # appending: one growing range
    assert extents.add(1, b"XY") == 0  # inside it: no new dirty bytes
    assert extents.add(10, b"z") == 1
    assert extents.add(6, b"1234") == 4  # fills the gap and joins both ranges
    assert extents.starts == [0] and bytes(extents.datas[0]) == b"aXYdef1234z"


def test_dirty_limit_mount_option() -> None:
    assert cimnfs.parse_options(OPTIONS).dirty_limit == cimnfs.DEFAULT_DIRTY_LIMIT == 256 * MIB
    opts = cimnfs.parse_options(f"{OPTIONS},dirty_limit=64M")
    assert opts.dirty_limit == 64 * MIB
    assert "dirty_limit=64M" not in opts.fuse_flags + opts.ignored
    assert [cimnfs.parse_size(s) for s in ("4096", "64k", "2MiB", "1G")] == [4096, 64 * KIB, 2 * MIB, 1024 * MIB]
    for bad in ("dirty_limit=lots", "dirty_limit=0"):
        with pytest.raises(cimnfs.OptionError):
            cimnfs.parse_options(bad)


# --- one model for both levels ---------------------------------------------------------------
MODES = {
    "r": os.O_RDONLY,
    "w": os.O_WRONLY,
    "rw": os.O_RDWR,
    "a": os.O_WRONLY | os.O_APPEND,
}


class Driver(Protocol):
    """One file on the stand-in, driven by handles (small ints)."""

    def open(self, mode: str) -> int: ...
    def write(self, handle: int, offset: int | None, data: bytes) -> None: ...  # None: O_APPEND
    def fsync(self, handle: int, datasync: bool) -> None: ...
    def close(self, handle: int) -> None: ...
    def truncate(self, handle: int, length: int) -> None: ...
    def read(self, handle: int, offset: int, size: int) -> bytes: ...
    def size(self) -> int: ...
    def power_off(self) -> bytes: ...  # the backing file's bytes after the cut


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("open"), st.sampled_from(sorted(MODES))),
        st.tuples(st.just("write"), st.integers(0, 7), st.integers(0, 200 * KIB), st.integers(1, 70 * KIB)),
        st.tuples(st.just("fsync"), st.integers(0, 7), st.booleans()),
        st.tuples(st.just("close"), st.integers(0, 7)),
        st.tuples(st.just("truncate"), st.integers(0, 7), st.integers(0, 250 * KIB)),
        st.tuples(st.just("read"), st.integers(0, 7), st.integers(0, 260 * KIB), st.integers(1, 70 * KIB)),
        st.tuples(st.just("stat")),
    ),
    max_size=30,
)


def run_model(driver: Driver, operations: Sequence[tuple[Any, ...]]) -> None:
    """Play OPERATIONS on DRIVER and on a model; after the power cut the file is the model's durable bytes.

    The model is NFS's: fsync on any handle, close of a handle open for writing, and a
    truncate (written back first, like nfs_setattr) make the file's current bytes durable.
    """
    current, durable = bytearray(), bytearray()
    handles: list[tuple[int, str]] = [(driver.open("rw"), "rw")]

    def pick(index: int, want: str) -> tuple[int, str] | None:
        if want == "w":
            usable = [h for h in handles if h[1] != "r"]
        elif want == "r":
            usable = [h for h in handles if h[1] in ("r", "rw")]
        else:
            usable = list(handles)
        return usable[index % len(usable)] if usable else None

    seed = 0
    for op in operations:
        name = op[0]
        if name == "open" and len(handles) < 6:
            handles.append((driver.open(op[1]), op[1]))
        elif name == "write" and (h := pick(op[1], "w")):
            seed += 7
            data = pattern(seed, op[3])
            offset = len(current) if h[1] == "a" else op[2]
            driver.write(h[0], None if h[1] == "a" else offset, data)
            current.extend(bytes(max(0, offset - len(current))))
            current[offset : offset + len(data)] = data
        elif name == "fsync" and (h := pick(op[1], "any")):
            driver.fsync(h[0], op[2])
            durable = bytearray(current)
        elif name == "close" and (h := pick(op[1], "any")):
            driver.close(h[0])
            handles.remove(h)
            if h[1] != "r":
                durable = bytearray(current)
        elif name == "truncate" and (h := pick(op[1], "w")):
            driver.truncate(h[0], op[2])
            del current[op[2] :]
            current.extend(bytes(op[2] - len(current)))
            durable = bytearray(current)
        elif name == "read" and (h := pick(op[1], "r")):
            assert driver.read(h[0], op[2], op[3]) == bytes(current[op[2] : op[2] + op[3]])
        elif name == "stat":
            assert driver.size() == len(current)
    assert driver.power_off() == bytes(durable)


class DirectDriver:
    """The operations called as fusepy would, with the kernel's part done here (O_APPEND offsets).

    The power cut: the CimNfs object is dropped without a release, as the daemon's memory is.
    """

    def __init__(self, root: Path, dirty_limit: int = cimnfs.DEFAULT_DIRTY_LIMIT) -> None:
        self.ops = cimnfs.CimNfs(
            str(root), "/mnt/direct", mounted_ns=0, flag_dir=str(root / ".flags"), dirty_limit=dirty_limit
        )
        self.ops.as_root = False  # no FUSE request context to take the caller's uid from
        self.root = root
        self.fis: dict[int, Any] = {}
        fi = SimpleNamespace(fh=0, flags=os.O_RDWR | os.O_CREAT)
        self.ops("create", "/f", 0o644, fi)
        self.ops("flush", "/f", fi)
        self.ops("release", "/f", fi)

    def open(self, mode: str) -> int:
        fi = SimpleNamespace(fh=0, flags=MODES[mode])
        self.ops("open", "/f", fi)
        self.fis[fi.fh] = fi
        return int(fi.fh)

    def write(self, handle: int, offset: int | None, data: bytes) -> None:
        fi = self.fis[handle]
        if offset is None:  # the kernel puts an O_APPEND write at the size it knows
            offset = self.ops("getattr", "/f", fi)["st_size"]
        assert self.ops("write", "/f", data, offset, fi) == len(data)

    def fsync(self, handle: int, datasync: bool) -> None:
        self.ops("fsync", "/f", int(datasync), self.fis[handle])

    def close(self, handle: int) -> None:
        fi = self.fis.pop(handle)
        self.ops("flush", "/f", fi)
        self.ops("release", "/f", fi)

    def truncate(self, handle: int, length: int) -> None:
        self.ops("truncate", "/f", length, self.fis[handle])

    def read(self, handle: int, offset: int, size: int) -> bytes:
        data: bytes = self.ops("read", "/f", size, offset, self.fis[handle])
        return data

    def size(self) -> int:
        return int(self.ops("getattr", "/f")["st_size"])

    def power_off(self) -> bytes:
        for fd in list(self.ops.handles):
            os.close(fd)
        for of in self.ops.files.values():
            if of.wfd >= 0:
                os.close(of.wfd)
        self.ops.handles.clear()
        self.ops.files.clear()
        return (self.root / "f").read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=OPERATIONS)
def test_generated_sequences_leave_the_durable_state_direct(
    tmp_path_factory: pytest.TempPathFactory, operations: list[tuple[Any, ...]]
) -> None:
    run_model(DirectDriver(tmp_path_factory.mktemp("direct")), operations)


def test_direct_write_back_points(tmp_path: Path) -> None:
    """The sync points one by one, without the kernel; and a crash of the daemon mid-way."""
    driver = DirectDriver(tmp_path)
    backing = tmp_path / "f"
    h = driver.open("rw")
    driver.write(h, 0, b"hello")
    assert backing.read_bytes() == b"" and driver.size() == 5
    assert driver.ops.dirty == 5
    driver.fsync(h, datasync=True)
    assert backing.read_bytes() == b"hello" and driver.ops.dirty == 0
    reader = driver.open("r")
    driver.write(h, 5, b" world")
    driver.close(reader)  # closing a read-only handle commits nothing (nfs_file_flush)
    assert backing.read_bytes() == b"hello"
    driver.ops("chmod", "/f", 0o600)  # a setattr commits first (nfs_setattr -> nfs_sync_inode)
    assert backing.read_bytes() == b"hello world"
    driver.write(h, 0, b"J")
    assert driver.power_off() == b"hello world"


def test_direct_dirty_limit_writes_back_oldest_first(tmp_path: Path) -> None:
    driver = DirectDriver(tmp_path, dirty_limit=100)
    ops = driver.ops
    first = driver.open("rw")
    driver.write(first, 0, b"a" * 60)
    other = SimpleNamespace(fh=0, flags=os.O_RDWR | os.O_CREAT)
    ops("create", "/g", 0o644, other)
    ops("write", "/g", b"b" * 30, 0, other)
    assert ops.dirty == 90
    ops("write", "/g", b"b" * 20, 30, other)  # 110 > 100: the oldest-dirtied file goes first
    assert (tmp_path / "f").read_bytes() == b"a" * 60
    assert (tmp_path / "g").read_bytes() == b"" and ops.dirty == 50


def test_direct_stale_mount_loses_dirty_data(tmp_path: Path) -> None:
    driver = DirectDriver(tmp_path)
    ops = driver.ops
    h = driver.open("w")
    driver.write(h, 0, b"kept")
    driver.fsync(h, datasync=False)
    driver.write(h, 4, b" lost")
    # Any flag is newer than this mount (mounted_ns=0): the mount is stale from now on.
    Path(ops.flag).parent.mkdir(parents=True, exist_ok=True)
    Path(ops.flag).touch()
    fi = driver.fis.pop(h)
    with pytest.raises(OSError) as exc:
        ops("flush", "/f", fi)  # close(2) fails, as on the NFS client
    assert exc.value.errno == errno.ESTALE
    ops("release", "/f", fi)  # the last release drops the overlay instead of writing it back
    assert (tmp_path / "f").read_bytes() == b"kept"
    assert ops.dirty == 0 and not ops.files and not ops.handles


# --- mount.cimnfs for real -------------------------------------------------------------------
def _fuse_problem() -> str | None:
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "not root (libfuse 2 mounts without fusermount only as root)"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    if shutil.which("umount") is None:
        return "no umount"
    try:
        cimnfs._import_fusepy()
    except (ImportError, OSError) as exc:
        return f"fusepy or libfuse2 missing ({exc}): apt-get install libfuse2; pip install fusepy"
    return None


FUSE_PROBLEM = _fuse_problem()


class MountError(RuntimeError):
    pass


class Mount:
    """mount.cimnfs on BASE/mnt over BASE/export, its flags and marker in BASE/flags."""

    def __init__(self, base: Path, options: str = OPTIONS) -> None:
        self.backing, self.point, self.flags = base / "export", base / "mnt", base / "flags"
        for directory in (self.backing, self.point, self.flags):
            directory.mkdir(parents=True, exist_ok=True)
        self.options = options
        self.pid = 0
        self.fds: list[int] = []

    def mount(self) -> Mount:
        env = {**os.environ, cimnfs.FLAG_DIR_ENV: str(self.flags)}
        argv = [sys.executable, str(HELPER), f"cimstor:{self.backing}", str(self.point), "-o", self.options]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)
        if proc.returncode != 0:
            raise MountError(f"mount.cimnfs failed ({proc.returncode}): {proc.stderr.strip()}")
        deadline = time.monotonic() + 10
        while True:  # the daemon records its pid when it answers the kernel's INIT
            with contextlib.suppress(OSError, ValueError):
                pid = cimnfs.read_marker(str(self.point), str(self.flags)).get("pid")
                if pid:
                    self.pid = int(pid)
                    return self
            if time.monotonic() > deadline:
                raise MountError("the daemon did not record its pid")
            time.sleep(0.01)

    def path(self, name: str) -> str:
        return str(self.point / name)

    def backing_bytes(self, name: str) -> bytes:
        return (self.backing / name).read_bytes()

    def open(self, name: str, flags: int, mode: int = 0o644) -> int:
        fd = os.open(self.path(name), flags, mode)
        self.fds.append(fd)
        return fd

    def close(self, fd: int) -> None:
        self.fds.remove(fd)
        os.close(fd)

    def mounted(self) -> bool:
        return any(line.split()[1] == str(self.point) for line in Path("/proc/mounts").read_text().splitlines())

    def daemon_alive(self) -> bool:
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return bool(self.pid) and state != "Z"

    def power_off(self) -> None:
        """The host's power cut as the NFS client sees it: the daemon dies, nothing written back."""
        os.kill(self.pid, signal.SIGKILL)
        assert wait_gone([self.pid], 10) == []
        self._drop_fds()
        self._detach()

    def unmount(self) -> None:
        """A clean lazy unmount: the daemon finishes once nothing uses the mount any more."""
        self._drop_fds()
        self._detach()
        assert wait_gone([self.pid], 10) == [], "the daemon did not exit after the unmount"

    def cleanup(self) -> None:
        self._drop_fds()
        if self.mounted():
            self._detach()
        if self.daemon_alive() and wait_gone([self.pid], 5):
            os.kill(self.pid, signal.SIGKILL)
            wait_gone([self.pid], 5)

    def _drop_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):  # ENOTCONN once the daemon is dead
                os.close(fd)
        self.fds.clear()

    def _detach(self) -> None:
        subprocess.run(["umount", "-l", str(self.point)], capture_output=True, timeout=30, check=False)


@contextlib.contextmanager
def mounted(base: Path, options: str = OPTIONS) -> Iterator[Mount]:
    mount = Mount(base, options)
    try:
        yield mount.mount()
    finally:
        mount.cleanup()


def _cannot_mount(problem: str) -> NoReturn:
    """In CI the stand-in's proof must run (make lab-deps installs libfuse2)."""
    missing_in_ci_fails(f"cannot mount FUSE on this machine: {problem}")


@pytest.fixture(scope="session")
def fuse_ok(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """FUSE works here (or the FUSE tests skip); every cimnfs mount under the tmp base goes at the end."""
    if FUSE_PROBLEM:
        _cannot_mount(FUSE_PROBLEM)
    base = tmp_path_factory.mktemp("cimnfs")
    try:
        with mounted(base / "probe") as probe:
            os.stat(probe.point)
    except MountError as exc:
        _cannot_mount(str(exc))
    yield base
    root = str(tmp_path_factory.getbasetemp())
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == f"fuse.{cimnfs.FSTYPE}" and fields[1].startswith(root):
            subprocess.run(["umount", "-l", fields[1]], capture_output=True, timeout=30, check=False)


@pytest.fixture
def mount(fuse_ok: Path, tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    made: list[Mount] = []

    def make(options: str = OPTIONS, name: str = "m") -> Mount:
        made.append(Mount(tmp_path / name, options))
        return made[-1].mount()

    yield make
    for one in made:
        one.cleanup()


fuse = pytest.mark.usefixtures("fuse_ok")


@fuse
def test_unsynced_write_is_lost_and_fsynced_write_survives(mount: Callable[..., Mount]) -> None:
    m = mount()
    unsynced = m.open("unsynced", os.O_RDWR | os.O_CREAT)
    os.write(unsynced, pattern(1, 300 * KIB))
    synced = m.open("synced", os.O_RDWR | os.O_CREAT)
    os.write(synced, pattern(2, 200 * KIB))
    os.fsync(synced)
    os.write(synced, b"written after the fsync")
    # The host sees its own writes; the share has only what was synced.
    assert os.stat(m.path("unsynced")).st_size == 300 * KIB
    assert m.backing_bytes("unsynced") == b""
    assert m.backing_bytes("synced") == pattern(2, 200 * KIB)
    m.power_off()
    assert m.backing_bytes("unsynced") == b""  # created (metadata is synchronous), data lost
    assert m.backing_bytes("synced") == pattern(2, 200 * KIB)
    m.mount()  # as at the next boot
    assert Path(m.path("synced")).read_bytes() == pattern(2, 200 * KIB)
    assert Path(m.path("unsynced")).read_bytes() == b""


@fuse
def test_fdatasync_and_close_commit_but_closing_a_reader_does_not(mount: Callable[..., Mount]) -> None:
    m = mount()
    writer = m.open("f", os.O_WRONLY | os.O_CREAT)
    os.write(writer, b"one")
    os.fdatasync(writer)
    assert m.backing_bytes("f") == b"one"
    os.write(writer, b"two")
    reader = m.open("f", os.O_RDONLY)
    assert os.read(reader, 100) == b"onetwo"
    m.close(reader)
    assert m.backing_bytes("f") == b"one"
    m.close(writer)  # close-to-open: the close flushes and commits
    assert m.backing_bytes("f") == b"onetwo"
    with open(m.path("g"), "wb") as out:
        out.write(b"closed")
    assert m.backing_bytes("g") == b"closed"
    again = m.open("f", os.O_WRONLY | os.O_APPEND)
    os.write(again, b"three")
    m.power_off()
    assert (m.backing_bytes("f"), m.backing_bytes("g")) == (b"onetwo", b"closed")


@fuse
def test_read_your_writes_through_every_handle(mount: Callable[..., Mount]) -> None:
    m = mount()
    base = pattern(3, 100)
    Path(m.path("f")).write_bytes(base)
    fd = m.open("f", os.O_RDWR)
    os.pwrite(fd, b"ABC", 10)
    os.pwrite(fd, b"Z", 150)  # past the end: a hole of zeros before it
    expected = base[:10] + b"ABC" + base[13:] + bytes(50) + b"Z"
    other = m.open("f", os.O_RDONLY)
    assert os.pread(other, 1000, 0) == expected
    assert os.pread(fd, 5, 148) == b"\0\0Z"
    assert os.fstat(other).st_size == os.stat(m.path("f")).st_size == 151
    assert m.backing_bytes("f") == base
    m.power_off()
    assert m.backing_bytes("f") == base


@fuse
def test_truncate_and_chmod_commit_dirty_data_first(mount: Callable[..., Mount]) -> None:
    m = mount()
    data = pattern(4, 100)
    fd = m.open("f", os.O_RDWR | os.O_CREAT)
    os.write(fd, data)
    os.ftruncate(fd, 10)
    assert m.backing_bytes("f") == data[:10]
    os.ftruncate(fd, 50)  # extending: zeros
    assert os.pread(fd, 100, 0) == data[:10] + bytes(40)
    os.pwrite(fd, b"late", 60)
    os.truncate(m.path("f"), 64)  # by path: the same
    assert m.backing_bytes("f") == data[:10] + bytes(50) + b"late"
    os.pwrite(fd, b"mode", 0)
    os.chmod(m.path("f"), 0o600)
    assert m.backing_bytes("f")[:4] == b"mode"
    os.pwrite(fd, b"lost", 0)
    m.power_off()
    assert m.backing_bytes("f") == b"mode" + data[4:10] + bytes(50) + b"late"


@fuse
def test_rename_and_unlink_of_files_with_dirty_data(mount: Callable[..., Mount]) -> None:
    m = mount()
    fd = m.open("old", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"dirty")
    os.rename(m.path("old"), m.path("new"))
    assert Path(m.path("new")).read_bytes() == b"dirty"  # the overlay belongs to the file, not the name
    assert m.backing_bytes("new") == b"" and not Path(m.path("old")).exists()
    os.fsync(fd)
    assert m.backing_bytes("new") == b"dirty"
    os.write(fd, b" more")
    # Unlinked while open, then closed: readable until the close, then gone without a trace.
    temp = m.open("temp", os.O_RDWR | os.O_CREAT)
    os.write(temp, b"scratch")
    os.unlink(m.path("temp"))
    assert os.pread(temp, 100, 0) == b"scratch"
    m.close(temp)
    deadline = time.monotonic() + 5
    while [n for n in os.listdir(m.backing) if n.startswith(".fuse_hidden")]:
        assert time.monotonic() < deadline, "the unlinked file was not removed after its release"
        time.sleep(0.02)
    # Unlinked while open at the power cut: left on the share under libfuse's hidden name, as a
    # crashed NFS client leaves its .nfsXXXX files; its unsynced data is lost.
    doomed = m.open("doomed", os.O_RDWR | os.O_CREAT)
    os.write(doomed, b"gone")
    os.unlink(m.path("doomed"))
    assert "doomed" not in os.listdir(m.point)
    m.power_off()
    assert m.backing_bytes("new") == b"dirty"
    hidden = [n for n in os.listdir(m.backing) if n.startswith(".fuse_hidden")]
    assert len(hidden) == 1 and m.backing_bytes(hidden[0]) == b""
    assert sorted(n for n in os.listdir(m.backing) if n not in hidden) == ["new"]


@fuse
def test_o_append_through_two_handles(mount: Callable[..., Mount]) -> None:
    m = mount()
    first = m.open("log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    second = m.open("log", os.O_WRONLY | os.O_APPEND)
    os.write(first, b"1" * 10)
    os.write(second, b"2" * 5)
    os.write(first, b"3" * 3)
    expected = b"1" * 10 + b"2" * 5 + b"3" * 3
    assert Path(m.path("log")).read_bytes() == expected
    assert m.backing_bytes("log") == b""
    os.fsync(second)  # the whole file, whichever handle wrote it
    assert m.backing_bytes("log") == expected
    os.write(first, b"4" * 4)
    m.power_off()
    assert m.backing_bytes("log") == expected


@fuse
def test_o_sync_and_o_dsync_writes_are_stable_when_write_returns(mount: Callable[..., Mount]) -> None:
    m = mount()
    for name, flag in (("sync", os.O_SYNC), ("dsync", os.O_DSYNC)):
        fd = m.open(name, os.O_WRONLY | os.O_CREAT | flag)
        os.write(fd, name.encode())
        assert m.backing_bytes(name) == name.encode()
    m.power_off()
    assert (m.backing_bytes("sync"), m.backing_bytes("dsync")) == (b"sync", b"dsync")


@fuse
def test_writes_above_the_dirty_limit_are_partly_durable(mount: Callable[..., Mount]) -> None:
    limit, total, chunk = 1 * MIB, 3 * MIB + 512 * KIB, 64 * KIB
    m = mount(f"{OPTIONS},dirty_limit={limit}")
    data = random.Random(5).randbytes(total)
    fd = m.open("big", os.O_WRONLY | os.O_CREAT)
    for offset in range(0, total, chunk):
        os.write(fd, data[offset : offset + chunk])
    assert total - limit <= len(m.backing_bytes("big")) < total
    m.power_off()
    got = m.backing_bytes("big")
    assert total - limit <= len(got) < total, "at most dirty_limit is lost, and the tail was not synced"
    assert got == data[: len(got)]


@fuse
def test_a_crashed_process_loses_nothing(mount: Callable[..., Mount]) -> None:
    """Only the host's power matters: a killed process's files are closed, and close flushes."""
    m = mount()
    script = (
        "import os, time\n"
        f"fd = os.open({m.path('crash')!r}, os.O_WRONLY | os.O_CREAT, 0o644)\n"
        "os.write(fd, b'x' * 100000)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            assert m.backing_bytes("crash") == b""
        finally:
            proc.kill()
            proc.wait(10)
    assert m.backing_bytes("crash") == b"x" * 100000
    m.power_off()
    assert m.backing_bytes("crash") == b"x" * 100000


def _wait_all_threads_stopped(pid: int, timeout: float = 10) -> None:
    """SIGSTOP wakes one thread; the group stop reaches the others later: wait for all of them."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        if states and all(state in ("T", "t") for state in states):
            return
        assert time.monotonic() < deadline, f"daemon threads not stopped: {states}"
        time.sleep(0.005)


@fuse
def test_every_write_reaches_the_daemon_before_it_returns(mount: Callable[..., Mount]) -> None:
    """No FUSE writeback cache: with the daemon stopped, write(2) waits for it."""
    m = mount()
    fd = m.open("f", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"warm")
    done = threading.Event()

    def write() -> None:
        os.write(fd, b"blocked")
        done.set()

    os.kill(m.pid, signal.SIGSTOP)
    try:
        _wait_all_threads_stopped(m.pid)
        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        assert not done.wait(0.5), "write(2) returned while the daemon was stopped: the kernel cached it"
    finally:
        os.kill(m.pid, signal.SIGCONT)
    assert done.wait(10)
    thread.join()
    assert Path(m.path("f")).read_bytes() == b"warmblocked"


@fuse
def test_posix_locks_work_on_the_mount(mount: Callable[..., Mount], tmp_path: Path) -> None:
    """fcntl locks are granted and conflict as on a local file (nats-server takes them on its
    store): the kernel keeps them, as NFS's lock manager would for this one client."""
    m = mount()
    fd = m.open("locked", os.O_RDWR | os.O_CREAT)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "import fcntl, sys; fcntl.lockf(open(sys.argv[1], 'r+'), fcntl.LOCK_EX | fcntl.LOCK_NB)",
            m.path("locked"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert other.returncode != 0 and "Resource temporarily unavailable" in other.stderr, other.stderr
    fcntl.lockf(fd, fcntl.LOCK_UN)


@fuse
def test_stale_mount_drops_dirty_data_and_a_new_mount_recovers(mount: Callable[..., Mount]) -> None:
    m = mount()
    fd = m.open("f", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"kept")
    os.fsync(fd)
    os.write(fd, b" lost")
    Path(cimnfs.flag_path(str(m.point), str(m.flags))).touch()
    with pytest.raises(OSError) as stat_error:
        os.stat(m.path("f"))
    with pytest.raises(OSError) as close_error:
        m.close(fd)
    assert stat_error.value.errno == close_error.value.errno == errno.ESTALE
    m.unmount()  # the daemon exits only after the release: it dropped the overlay
    assert m.backing_bytes("f") == b"kept"
    m.mount()
    assert Path(m.path("f")).read_bytes() == b"kept"


@fuse
def test_fault_finds_the_fuse_daemon_by_its_dev_fuse(
    mount: Callable[..., Mount], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `fault power-loss` kills first: the processes holding /dev/fuse open."""
    m = mount()
    monkeypatch.setattr(hosts, "cgroup_pids", lambda host: [os.getpid(), m.pid])
    assert faults.fuse_daemons(Host("nats-x", "127.0.0.2", 8)) == [m.pid]


class FuseDriver:
    def __init__(self, m: Mount) -> None:
        self.m = m
        os.close(os.open(m.path("f"), os.O_RDWR | os.O_CREAT, 0o644))

    def open(self, mode: str) -> int:
        return self.m.open("f", MODES[mode])

    def write(self, handle: int, offset: int | None, data: bytes) -> None:
        written = os.write(handle, data) if offset is None else os.pwrite(handle, data, offset)
        assert written == len(data)

    def fsync(self, handle: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(handle)

    def close(self, handle: int) -> None:
        self.m.close(handle)

    def truncate(self, handle: int, length: int) -> None:
        os.ftruncate(handle, length)

    def read(self, handle: int, offset: int, size: int) -> bytes:
        return os.pread(handle, size, offset)

    def size(self) -> int:
        return os.stat(self.m.path("f")).st_size

    def power_off(self) -> bytes:
        self.m.power_off()
        return self.m.backing_bytes("f")


@fuse
@settings(
    max_examples=int(os.environ.get("CIMNFS_FUSE_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(operations=OPERATIONS)
def test_generated_sequences_leave_the_durable_state_fuse(fuse_ok: Path, operations: list[tuple[Any, ...]]) -> None:
    """The same model through the kernel: after the power cut the share holds exactly the durable bytes."""
    base = Path(os.path.join(fuse_ok, f"gen-{time.monotonic_ns()}"))
    with mounted(base) as m:
        run_model(FuseDriver(m), operations)
