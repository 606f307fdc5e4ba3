#!/usr/bin/python3
"""mount.cimnfs: a FUSE passthrough filesystem that stands in for the NFS share in the lab.

Installed in the lab's base image as /usr/sbin/mount.cimnfs, so mount(8), fstab and
ansible.posix.mount use it like any other filesystem type (fstype ``cimnfs``):

    mount.cimnfs cimstor:/srv/cimstor-export/nats-1 /mnt/cimstor-jetstream -o rw,hard,...

The text after the first ``:`` of SOURCE is the backing directory. NFS-only options are
accepted and ignored so the production option string works unchanged.

Stale handles: once the flag file ``/run/cimnfs/<key>.stale`` (key = the quoted mount
point) gets an mtime later than the moment this mount was made, every operation on THIS
mount fails with ESTALE, as on an NFS client whose server lost the export. A fresh mount
made after that is healthy, so ``umount -l`` + ``mount`` recovers, as on real NFS.

Write path (what survives a power loss): written data stays in THIS daemon's memory, a
per-file dirty overlay of byte ranges, the way an NFS client keeps written pages in its page
cache; reads see it (through every handle of the file) and getattr reports the size and mtime
it implies. It goes to the backing file, followed by an fsync of the backing file, only at the
points where an NFS client sends WRITE + COMMIT to a ``sync`` export:

- fsync(2) / fdatasync(2) on any handle of the file (the whole file, as nfs_file_fsync does);
- close(2) of a handle opened for writing (FUSE FLUSH: close-to-open, nfs_file_flush);
  closing a read-only handle writes nothing, as on NFS;
- every write on a handle opened with O_SYNC, O_DSYNC or O_DIRECT (stable writes);
- truncate/ftruncate, chmod, chown and utimens of a file with dirty data: the overlay is
  written back first, then the change is made (nfs_setattr calls nfs_sync_inode first);
- the mount's dirty bytes passing ``dirty_limit`` (mount option, default 256 MiB): the
  oldest-dirtied files are written back until half of it is left, like the kernel's dirty
  writeback, so at most that much can be lost;
- the last release of a file (normally clean by then: its close flushed it) and unmount.

Metadata operations (create, mkdir, rename, unlink, link, symlink...) go to the backing
directory at once, as they are synchronous on an NFS server. So when the host loses power
(SIGKILL of everything in it, this daemon included) exactly the writes made since the file's
last sync point are lost, and nothing else: no special "drop" code path exists, the kill is
the fault. A process that merely crashes loses nothing: the kernel closes its files, which
flushes them, as on NFS.

The stand-in is the worst case NFS allows: a real client also writes dirty pages back on its
own (after ~30 s, dirty_expire_centisecs) and on stat(2) (nfs_getattr; those are unstable
WRITEs that a site-wide outage still loses), and sync(2) flushes it; this daemon never does,
so it loses a superset of what a real client would. libfuse 2 (fusepy) cannot enable the
kernel's FUSE writeback cache, so every write(2) reaches this daemon before it returns; the
kernel keeps only clean copies (dropped on open, as no keep_cache is set).

Attributes and names are cached by the kernel for 1 s (attr_timeout, entry_timeout), as an
NFS client caches them (acregmin 3 s and acdirmin 30 s by default): without that every path
component of every call came here, 480 lookups per JetStream consumer created, and the three
daemons took more CPU than the three servers. A write still invalidates its file's attributes,
and every open, read, write and metadata change still reaches this daemon (and its stale check).
POSIX locks are left to the kernel (no ``lock`` operation), as for one NFS client.

With a stale mount (above) the dirty data is lost with it, as on NFS: flush and fsync fail
with ESTALE, and the last release drops the overlay instead of writing it back.

This file runs with the Debian python3 inside the lab hosts (stdlib + python3-fusepy), so
it must not import anything from nats_lab; the machine side imports it for the helpers.
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import stat
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

FLAG_DIR = "/run/cimnfs"
# Where the stale flags and mount markers go instead (the stand-in's own tests on a machine).
FLAG_DIR_ENV = "CIMNFS_FLAG_DIR"
FSTYPE = "cimnfs"
# The mount's dirty bytes above which the oldest-dirtied files are written back (-o dirty_limit=).
DEFAULT_DIRTY_LIMIT = 256 * 1024 * 1024
# mount(8) helpers report failures with this exit status (see mount(8), "RETURN CODES").
EXIT_USAGE = 1
EXIT_MOUNT_FAILURE = 32

# Generic mount options that libfuse understands and passes on to the kernel mount.
PASSTHROUGH_FLAGS = frozenset(
    {
        "rw",
        "ro",
        "suid",
        "nosuid",
        "dev",
        "nodev",
        "exec",
        "noexec",
        "async",
        "sync",
        "atime",
        "noatime",
        "dirsync",
    }
)
# Options that only mean something to mount(8), systemd or the NFS client: accepted, ignored.
IGNORED_FLAGS = frozenset(
    {
        "defaults",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "owner",
        "group",
        "nofail",
        "_netdev",
        "loud",
        "silent",
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "lazytime",
        "nolazytime",
        "diratime",
        "nodiratime",
        "iversion",
        "noiversion",
        "mand",
        "nomand",
        # NFS client flags
        "hard",
        "soft",
        "softerr",
        "intr",
        "nointr",
        "bg",
        "fg",
        "ac",
        "noac",
        "cto",
        "nocto",
        "lock",
        "nolock",
        "acl",
        "noacl",
        "rdirplus",
        "nordirplus",
        "sharecache",
        "nosharecache",
        "resvport",
        "noresvport",
        "fsc",
        "nofsc",
        "posix",
        "noposix",
        "migration",
        "nomigration",
        "trunkdiscovery",
        "notrunkdiscovery",
        "tcp",
        "udp",
        "rdma",
    }
)
IGNORED_KEYS = frozenset(
    {
        "timeo",
        "retrans",
        "retry",
        "nfsvers",
        "vers",
        "minorversion",
        "proto",
        "mountproto",
        "port",
        "mountport",
        "mounthost",
        "mountvers",
        "mountaddr",
        "addr",
        "clientaddr",
        "rsize",
        "wsize",
        "bsize",
        "sec",
        "namlen",
        "acregmin",
        "acregmax",
        "acdirmin",
        "acdirmax",
        "actimeo",
        "lookupcache",
        "local_lock",
        "nconnect",
        "max_connect",
        "xprtsec",
        "write",
        "fsc",
        "comment",
        "context",
        "fscontext",
        "defcontext",
        "rootcontext",
    }
)
IGNORED_PREFIXES = ("x-", "X-")


class OptionError(ValueError):
    """A mount option this helper does not know (and -s, sloppy, was not given)."""


@dataclass(frozen=True)
class MountOptions:
    """The result of parsing a mount option string."""

    fuse_flags: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    read_only: bool = False
    dirty_limit: int = DEFAULT_DIRTY_LIMIT


_SIZE_SUFFIXES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """``4096``, ``64k``, ``256M``, ``1G`` -> bytes (binary units)."""
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    suffix = value[-1:] if value[-1:] in _SIZE_SUFFIXES else ""
    number = value[: len(value) - len(suffix)]
    if not number.isdigit():
        raise OptionError(f"not a size: {text!r}")
    return int(number) * _SIZE_SUFFIXES[suffix]


def parse_options(text: str, *, sloppy: bool = False) -> MountOptions:
    """Split ``-o`` text into options passed to the FUSE mount, the helper's own, and ignored ones."""
    flags: list[str] = []
    ignored: list[str] = []
    read_only = False
    dirty_limit = DEFAULT_DIRTY_LIMIT
    for raw in text.split(","):
        opt = raw.strip()
        if not opt:
            continue
        key, _, value = opt.partition("=")
        if opt in PASSTHROUGH_FLAGS:
            if opt in ("ro", "rw"):
                read_only = opt == "ro"
            else:
                flags.append(opt)
        elif key == "dirty_limit" and value:
            dirty_limit = parse_size(value)
            if dirty_limit <= 0:
                raise OptionError("dirty_limit must be positive")
        elif opt in IGNORED_FLAGS or ("=" in opt and key in IGNORED_KEYS) or opt.startswith(IGNORED_PREFIXES) or sloppy:
            ignored.append(opt)
        else:
            raise OptionError(f"unknown mount option {opt!r}")
    if read_only:
        flags.append("ro")
    # The last of several atime-style flags wins, as with mount(8): keep the order.
    return MountOptions(fuse_flags=tuple(flags), ignored=tuple(ignored), read_only=read_only, dirty_limit=dirty_limit)


def backing_dir(source: str) -> str:
    """``cimstor:/srv/cimstor-export/x`` -> ``/srv/cimstor-export/x`` (a plain path is fine)."""
    path = source.split(":", 1)[1] if ":" in source else source
    if not path.startswith("/"):
        raise OptionError(f"source {source!r} must be HOST:/absolute/path")
    return os.path.normpath(path)


def mount_key(mountpoint: str) -> str:
    """File-name-safe, unambiguous key of a mount point (``/a/b`` -> ``%2Fa%2Fb``)."""
    return urllib.parse.quote(os.path.normpath(mountpoint), safe="")


def flag_path(mountpoint: str, flag_dir: str = FLAG_DIR) -> str:
    """Touching this file makes the current mount at MOUNTPOINT stale."""
    return os.path.join(flag_dir, mount_key(mountpoint) + ".stale")


def marker_path(mountpoint: str, flag_dir: str = FLAG_DIR) -> str:
    """Written at mount time: source, options and mount time of the current mount."""
    return os.path.join(flag_dir, mount_key(mountpoint) + ".mount")


@dataclass(frozen=True)
class Invocation:
    """How mount(8) called the helper."""

    source: str
    mountpoint: str
    options: str = ""
    sloppy: bool = False
    fake: bool = False
    verbose: bool = False
    extra: tuple[str, ...] = field(default=())


def parse_argv(argv: list[str]) -> Invocation:
    """Parse ``mount.cimnfs SOURCE DIR [-sfnv] [-N NS] [-o OPTS] [-t TYPE]`` (see mount(8))."""
    positional: list[str] = []
    options: list[str] = []
    sloppy = fake = verbose = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-o", "-t", "-N"):
            if i + 1 >= len(argv):
                raise OptionError(f"option {arg} needs a value")
            if arg == "-o":
                options.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("-o") and len(arg) > 2:
            options.append(arg[2:])
        elif arg.startswith("-") and len(arg) > 1 and set(arg[1:]) <= set("sfnvrw"):
            sloppy |= "s" in arg
            fake |= "f" in arg
            verbose |= "v" in arg
            if "r" in arg:
                options.append("ro")
            if "w" in arg:
                options.append("rw")
        elif arg.startswith("-") and len(arg) > 1:
            raise OptionError(f"unknown argument {arg!r}")
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 2:
        raise OptionError("usage: mount.cimnfs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]")
    return Invocation(
        source=positional[0],
        mountpoint=positional[1],
        options=",".join(options),
        sloppy=sloppy,
        fake=fake,
        verbose=verbose,
    )


STAT_KEYS = (
    "st_mode",
    "st_ino",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_size",
    "st_blocks",
    "st_blksize",
    "st_rdev",
)
# Open flags the backing file is opened without: the kernel has already turned O_APPEND into
# offsets and O_TRUNC into a setattr; O_DIRECT would want aligned buffers; O_SYNC and O_DSYNC
# are honoured by writing back after each write (see CimNfs.write).
BACKING_STRIP = os.O_APPEND | os.O_TRUNC | os.O_DIRECT | os.O_SYNC | os.O_DSYNC
# Handles whose writes are stable when write(2) returns, as on NFS (FILE_SYNC / direct I/O + COMMIT).
STABLE_FLAGS = os.O_SYNC | os.O_DSYNC | os.O_DIRECT

Key = tuple[int, int]


class Extents:
    """The dirty overlay of one file: disjoint, non-touching byte ranges, sorted by offset."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.datas: list[bytearray] = []
        self.nbytes = 0

    def __bool__(self) -> bool:
        return bool(self.starts)

    @property
    def end(self) -> int:
        """One past the last dirty byte (0 when clean)."""
        return self.starts[-1] + len(self.datas[-1]) if self.starts else 0

    def add(self, offset: int, data: bytes | bytearray) -> int:
        """Record DATA at OFFSET (over older dirty bytes); return the change in dirty bytes."""
        size = len(data)
        if size == 0:
            return 0
        end = offset + size
        if self.starts and offset == self.end:  # the common case: appending to the file
            self.datas[-1] += data
            self.nbytes += size
            return size
        # first: the first range ending at or after OFFSET; last: the last one starting at or before END.
        first = bisect.bisect_right(self.starts, offset) - 1
        if first < 0 or self.starts[first] + len(self.datas[first]) < offset:
            first += 1
        last = bisect.bisect_right(self.starts, end) - 1
        if last < first:
            self.starts.insert(first, offset)
            self.datas.insert(first, bytearray(data))
            self.nbytes += size
            return size
        first_start = self.starts[first]
        last_end = self.starts[last] + len(self.datas[last])
        if first == last and first_start <= offset and end <= last_end:
            rel = offset - first_start
            self.datas[first][rel : rel + size] = data
            return 0
        merged = bytearray(self.datas[first][: max(0, offset - first_start)])
        merged += data
        if last_end > end:
            merged += self.datas[last][end - self.starts[last] :]
        old = sum(len(d) for d in self.datas[first : last + 1])
        self.starts[first : last + 1] = [min(offset, first_start)]
        self.datas[first : last + 1] = [merged]
        delta = len(merged) - old
        self.nbytes += delta
        return delta

    def overlay(self, offset: int, buf: bytearray) -> None:
        """Copy the dirty bytes that fall in [OFFSET, OFFSET + len(BUF)) over BUF."""
        stop = offset + len(buf)
        i = max(0, bisect.bisect_right(self.starts, offset) - 1)
        while i < len(self.starts) and self.starts[i] < stop:
            start, data = self.starts[i], self.datas[i]
            lo, hi = max(start, offset), min(start + len(data), stop)
            if lo < hi:
                buf[lo - offset : hi - offset] = data[lo - start : hi - start]
            i += 1

    def pop_first(self) -> tuple[int, bytearray]:
        start, data = self.starts.pop(0), self.datas.pop(0)
        self.nbytes -= len(data)
        return start, data

    def clear(self) -> int:
        """Forget every dirty byte; return how many there were."""
        dropped = self.nbytes
        self.starts, self.datas, self.nbytes = [], [], 0
        return dropped


@dataclass(eq=False)
class OpenFile:
    """One backing file (by device and inode) while this mount has handles open on it."""

    key: Key
    handles: set[int] = field(default_factory=set)
    extents: Extents = field(default_factory=Extents)
    # A dup of the first handle that wrote: the overlay is written back through it.
    wfd: int = -1
    # Bytes went to the backing file since its last fsync.
    unsynced: bool = False
    dirtied_ns: int = 0
    mtime_ns: int = 0
    retired: bool = False


@dataclass(frozen=True)
class Handle:
    """One FUSE file handle: fi.fh is the backing file descriptor."""

    fd: int
    key: Key | None  # None: not a regular file, passed through as it is
    writable: bool
    stable: int  # its O_SYNC / O_DSYNC / O_DIRECT bits


def _pwrite_all(fd: int, data: bytes | bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class CimNfs:
    """The operations for fusepy (raw_fi mode: file ops get the fuse_file_info).

    fusepy runs them on several threads (nothreads=False): ``mutex`` guards the overlay
    (files, handles, dirty); backing-file fsyncs run outside it, on a dup of the descriptor.
    """

    # Times as integer nanoseconds (fusepy reads this attribute).
    use_ns = True

    def __init__(
        self,
        root: str,
        mountpoint: str,
        mounted_ns: int,
        *,
        flag_dir: str = FLAG_DIR,
        dirty_limit: int = DEFAULT_DIRTY_LIMIT,
    ) -> None:
        self.root = root
        self.mountpoint = mountpoint
        self.flag_dir = flag_dir
        self.flag = flag_path(mountpoint, flag_dir)
        self.mounted_ns = mounted_ns
        self.stale = False
        self.as_root = os.geteuid() == 0
        self.dirty_limit = dirty_limit
        # Not named ``lock``: fusepy would take it for the POSIX-lock operation and answer EINVAL.
        self.mutex = threading.Lock()
        self.files: dict[Key, OpenFile] = {}
        self.handles: dict[int, Handle] = {}
        self.dirty = 0  # bytes in all overlays of this mount

    # fusepy calls operations(op, *args) for every request: one place for the stale check.
    def __call__(self, op: str, *args: Any) -> Any:
        if op not in ("release", "releasedir", "destroy"):
            self._check_stale()
        return getattr(self, op)(*args)

    def _is_stale(self) -> bool:
        if not self.stale:
            try:
                flag_mtime = os.stat(self.flag).st_mtime_ns
            except FileNotFoundError:
                return False
            self.stale = flag_mtime >= self.mounted_ns
        return self.stale

    def _check_stale(self) -> None:
        if self._is_stale():
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))

    def _real(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _own(self, real: str) -> None:
        """Give a new file to the calling user, as an NFS server with root squash off would."""
        if not self.as_root:
            return
        uid, gid, _pid = fuse_get_context()
        parent = os.stat(os.path.dirname(real))
        if parent.st_mode & stat.S_ISGID:
            gid = parent.st_gid  # setgid directory: the group comes from the directory
        os.lchown(real, uid, gid)

    # --- the dirty overlay -----------------------------------------------------------------
    def _open_file(self, fd: int) -> OpenFile | None:
        handle = self.handles.get(fd)
        if handle is None or handle.key is None:
            return None
        return self.files.get(handle.key)

    def _write_back(self, of: OpenFile, *, sync_fd: int = -1, datasync: bool = False, force: bool = False) -> None:
        """Write OF's overlay to the backing file, then fsync that (NFS: WRITE + COMMIT).

        FORCE: fsync even if nothing went to the backing file since the last fsync (fsync(2)).
        A write that fails leaves its bytes dirty, for the next sync point to retry.
        """
        with self.mutex:
            if of.retired:
                return
            while of.extents:
                start, data = of.extents.pop_first()
                self.dirty -= len(data)
                of.unsynced = True
                try:
                    _pwrite_all(of.wfd, data, start)
                except OSError:
                    self.dirty += of.extents.add(start, data)
                    raise
            if not (of.unsynced or force):
                return
            base = of.wfd if of.wfd >= 0 else sync_fd
            if base < 0:
                return
            of.unsynced = False
            fd = os.dup(base)
        try:
            if datasync:
                os.fdatasync(fd)
            else:
                os.fsync(fd)
        except OSError:
            with self.mutex:
                of.unsynced = True
            raise
        finally:
            os.close(fd)

    def _balance_dirty(self) -> None:
        """Above dirty_limit: write back the oldest-dirtied files until half of it is left."""
        while True:
            with self.mutex:
                if self.dirty <= self.dirty_limit // 2:
                    return
                dirty = [of for of in self.files.values() if of.extents]
                if not dirty:
                    return
                oldest = min(dirty, key=lambda of: of.dirtied_ns)
            self._write_back(oldest)

    def _retire(self, of: OpenFile) -> None:
        """OF's last handle is gone: write back what is left, or drop it if the mount is stale."""
        try:
            if (of.extents or of.unsynced) and not self._is_stale():
                self._write_back(of)
        except OSError as exc:
            print(f"mount.cimnfs: write-back of inode {of.key[1]} failed: {exc}", file=sys.stderr)
        finally:
            with self.mutex:
                # A stale mount's dirty data is lost with it, as on an NFS client.
                self.dirty -= of.extents.clear()
                of.retired = True
                if of.wfd >= 0:
                    os.close(of.wfd)
                    of.wfd = -1

    def _sync_before_setattr(self, real: str, fh: Any = None) -> None:
        """nfs_setattr: a regular file's dirty data is written and committed before any change."""
        with self.mutex:
            if fh:
                of = self._open_file(fh.fh)
            else:
                try:
                    st = os.lstat(real)
                except FileNotFoundError:
                    return
                of = self.files.get((st.st_dev, st.st_ino)) if stat.S_ISREG(st.st_mode) else None
        if of is not None and (of.extents or of.unsynced):
            self._write_back(of)

    def _open_backing(self, real: str, flags: int, mode: int = 0o777) -> int:
        wanted = flags & ~BACKING_STRIP
        if wanted & os.O_ACCMODE == os.O_WRONLY:
            # Read access as well where allowed: reads of the file then never fail on the fd.
            try:
                return os.open(real, (wanted & ~os.O_ACCMODE) | os.O_RDWR, mode)
            except PermissionError:
                pass
        return os.open(real, wanted, mode)

    def _register(self, fd: int, flags: int) -> None:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None
        handle = Handle(fd, key, writable=flags & os.O_ACCMODE != os.O_RDONLY, stable=flags & STABLE_FLAGS)
        with self.mutex:
            self.handles[fd] = handle
            if key is not None:
                of = self.files.get(key)
                if of is None:
                    of = self.files[key] = OpenFile(key)
                of.handles.add(fd)
        if flags & os.O_TRUNC and key is not None and handle.writable:
            # Only if the kernel passes O_TRUNC on (atomic_o_trunc): the same as ftruncate(fd, 0).
            self.truncate("", 0, _Fh(fd))

    # --- metadata -----------------------------------------------------------------------
    def init(self, path: str) -> None:
        # Runs in the daemon itself (libfuse forks before the first request): record its pid.
        try:
            update_marker(self.mountpoint, self.flag_dir, pid=os.getpid())
        except OSError as exc:
            print(f"mount.cimnfs: cannot record the daemon's pid: {exc}", file=sys.stderr)

    def destroy(self, path: str) -> None:
        with self.mutex:
            left = list(self.files.values())
            self.files.clear()
        for of in left:
            self._retire(of)

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        # fh is the fuse_file_info for fstat(2), or a NULL pointer (falsy) otherwise.
        st = os.fstat(fh.fh) if fh else os.lstat(self._real(path))
        attrs: dict[str, Any] = {key: getattr(st, key) for key in STAT_KEYS}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        if stat.S_ISREG(st.st_mode):
            with self.mutex:
                of = self.files.get((st.st_dev, st.st_ino))
                if of is not None and of.extents:
                    # What the client's own cache implies: its size, and the time of its last write.
                    size = max(st.st_size, of.extents.end)
                    attrs.update(
                        st_size=size,
                        st_blocks=max(st.st_blocks, (size + 511) // 512),
                        st_mtime=max(st.st_mtime_ns, of.mtime_ns),
                        st_ctime=max(st.st_ctime_ns, of.mtime_ns),
                    )
        return attrs

    def statfs(self, path: str) -> dict[str, int]:
        # The backing file system's real numbers: free-space checks must see the share's.
        sv = os.statvfs(self._real(path))
        keys = (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_flag",
            "f_namemax",
        )
        return {key: getattr(sv, key) for key in keys}

    def chmod(self, path: str, mode: int) -> None:
        real = self._real(path)
        self._sync_before_setattr(real)
        os.chmod(real, mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        real = self._real(path)
        self._sync_before_setattr(real)
        os.lchown(real, uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        real = self._real(path)
        self._sync_before_setattr(real)
        if times is None:
            os.utime(real, follow_symlinks=False)
        else:
            os.utime(real, ns=times, follow_symlinks=False)

    def readlink(self, path: str) -> str:
        return os.readlink(self._real(path))

    def truncate(self, path: str, length: int, fh: Any = None) -> None:
        real = self._real(path)
        self._sync_before_setattr(real, fh)
        if fh:
            os.ftruncate(fh.fh, length)
        else:
            os.truncate(real, length)

    # --- names ----------------------------------------------------------------------------
    # Synchronous on the backing directory, as on an NFS server. The overlay belongs to the
    # inode, so renaming a file with dirty data keeps it; libfuse hides a file unlinked while
    # open as .fuse_hidden* until its last release (NFS: .nfs* "silly rename").
    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", *os.listdir(self._real(path))]

    def mkdir(self, path: str, mode: int) -> None:
        real = self._real(path)
        os.mkdir(real, mode)
        self._own(real)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._real(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._real(path))

    def rename(self, old: str, new: str) -> None:
        os.rename(self._real(old), self._real(new))

    def symlink(self, target: str, source: str) -> None:
        # fusepy: create the symlink TARGET pointing to SOURCE (ln -s SOURCE TARGET)
        real = self._real(target)
        os.symlink(source, real)
        self._own(real)

    def link(self, target: str, source: str) -> None:
        # fusepy: create the hard link TARGET to the existing SOURCE (ln SOURCE TARGET)
        os.link(self._real(source), self._real(target))

    def mknod(self, path: str, mode: int, dev: int) -> None:
        real = self._real(path)
        os.mknod(real, mode, dev)
        self._own(real)

    def fsyncdir(self, path: str, datasync: int, fh: Any) -> None:
        fd = os.open(self._real(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- files ----------------------------------------------------------------------------
    def create(self, path: str, mode: int, fi: Any) -> int:
        real = self._real(path)
        fd = self._open_backing(real, fi.flags | os.O_CREAT, mode)
        try:
            self._own(real)
        except BaseException:
            os.close(fd)
            raise
        fi.fh = fd
        self._register(fd, fi.flags)
        return 0

    def open(self, path: str, fi: Any) -> int:
        fd = self._open_backing(self._real(path), fi.flags)
        fi.fh = fd
        self._register(fd, fi.flags)
        return 0

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        with self.mutex:
            of = self._open_file(fi.fh)
            if of is not None and of.extents:
                # Read-your-writes: the backing bytes with the overlay on top, up to its size.
                total = max(os.fstat(fi.fh).st_size, of.extents.end)
                count = min(size, total - offset)
                if count <= 0:
                    return b""
                buf = bytearray(os.pread(fi.fh, count, offset))
                buf.extend(bytes(count - len(buf)))
                of.extents.overlay(offset, buf)
                return bytes(buf)
        return os.pread(fi.fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        handle = self.handles.get(fi.fh)
        if handle is None or handle.key is None:
            return os.pwrite(fi.fh, data, offset)
        with self.mutex:
            of = self.files[handle.key]
            if of.wfd < 0:
                of.wfd = os.dup(fi.fh)
            if not of.extents:
                of.dirtied_ns = time.monotonic_ns()
            self.dirty += of.extents.add(offset, data)
            of.mtime_ns = time.time_ns()
            over = self.dirty > self.dirty_limit
        if handle.stable:
            self._write_back(of, datasync=handle.stable & os.O_SYNC != os.O_SYNC)
        elif over:
            try:
                self._balance_dirty()
            except OSError as exc:
                # The bytes stay dirty; the file's next fsync or close retries and reports it.
                print(f"mount.cimnfs: dirty write-back failed: {exc}", file=sys.stderr)
        return len(data)

    def flush(self, path: str, fi: Any) -> None:
        # close(2): close-to-open. Only a handle open for writing flushes (nfs_file_flush).
        handle = self.handles.get(fi.fh)
        if handle is None or not handle.writable:
            return
        with self.mutex:
            of = self._open_file(fi.fh)
        if of is not None:
            self._write_back(of, sync_fd=fi.fh)

    def fsync(self, path: str, datasync: int, fi: Any) -> None:
        with self.mutex:
            of = self._open_file(fi.fh)
        if of is None:
            if datasync:
                os.fdatasync(fi.fh)
            else:
                os.fsync(fi.fh)
            return
        self._write_back(of, sync_fd=fi.fh, datasync=bool(datasync), force=True)

    def release(self, path: str, fi: Any) -> None:
        fd = fi.fh
        retire = None
        with self.mutex:
            handle = self.handles.pop(fd, None)
            of = self.files.get(handle.key) if handle is not None and handle.key is not None else None
            if of is not None:
                of.handles.discard(fd)
                if not of.handles:
                    del self.files[of.key]
                    retire = of
        try:
            if retire is not None:
                self._retire(retire)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class _Fh:
    """A stand-in fuse_file_info for calls made from inside (only .fh is read)."""

    fh: int


def fuse_get_context() -> tuple[int, int, int]:
    """(uid, gid, pid) of the process that made the current request."""
    fusepy = _import_fusepy()
    uid, gid, pid = fusepy.fuse_get_context()
    return int(uid), int(gid), int(pid)


def _import_fusepy() -> Any:
    # Debian's python3-fusepy installs the module as "fusepy"; pip's fusepy as "fuse".
    try:
        import fusepy  # noqa: PLC0415
    except ImportError:
        import fuse as fusepy  # noqa: PLC0415
    return fusepy


def flag_dir() -> str:
    """FLAG_DIR, or where $CIMNFS_FLAG_DIR says (the stand-in's own tests use a tmp dir)."""
    return os.environ.get(FLAG_DIR_ENV) or FLAG_DIR


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(data, out)
    os.replace(tmp, path)


def write_marker(inv: Invocation, mounted_ns: int, directory: str = FLAG_DIR) -> None:
    os.makedirs(directory, exist_ok=True)
    data = {
        "source": inv.source,
        "mountpoint": os.path.normpath(inv.mountpoint),
        "options": inv.options,
        "mounted_ns": mounted_ns,
    }
    _write_json(marker_path(inv.mountpoint, directory), data)


def read_marker(mountpoint: str, directory: str = FLAG_DIR) -> dict[str, Any]:
    """The current mount's record: source, options, mounted_ns and (once it runs) the daemon's pid."""
    with open(marker_path(mountpoint, directory), encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


def update_marker(mountpoint: str, directory: str = FLAG_DIR, **fields: Any) -> None:
    data = read_marker(mountpoint, directory)
    data.update(fields)
    _write_json(marker_path(mountpoint, directory), data)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        inv = parse_argv(args)
        opts = parse_options(inv.options, sloppy=inv.sloppy)
        root = backing_dir(inv.source)
    except OptionError as exc:
        print(f"mount.cimnfs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not os.path.isdir(root):
        print(f"mount.cimnfs: backing directory {root} does not exist", file=sys.stderr)
        return EXIT_MOUNT_FAILURE
    if not os.path.isdir(inv.mountpoint):
        print(f"mount.cimnfs: mount point {inv.mountpoint} does not exist", file=sys.stderr)
        return EXIT_MOUNT_FAILURE
    if inv.verbose and opts.ignored:
        print(f"mount.cimnfs: ignoring {','.join(opts.ignored)}", file=sys.stderr)
    if inv.fake:
        return 0
    fusepy = _import_fusepy()
    # Modes arrive already masked by the caller's umask: apply them unchanged.
    os.umask(0)
    mounted_ns = time.time_ns()
    flags_at = flag_dir()
    write_marker(inv, mounted_ns, flags_at)
    ops = CimNfs(root, inv.mountpoint, mounted_ns, flag_dir=flags_at, dirty_limit=opts.dirty_limit)
    kwargs: dict[str, Any] = {flag: True for flag in opts.fuse_flags}
    try:
        # foreground=False: libfuse mounts first, then daemonizes, so mount(8) returns
        # once the file system is there (or fails with the mount error).
        # No kernel_cache/auto_cache (the kernel drops its clean copies on open), and libfuse 2
        # has no writeback_cache: each write(2) reaches this daemon before it returns.
        fusepy.FUSE(
            ops,
            inv.mountpoint,
            foreground=False,
            raw_fi=True,
            nothreads=False,
            allow_other=True,
            default_permissions=True,
            use_ino=True,
            big_writes=True,
            max_write=131072,
            attr_timeout=1,
            entry_timeout=1,
            negative_timeout=0,
            fsname=inv.source,
            subtype=FSTYPE,
            **kwargs,
        )
    except RuntimeError as exc:
        print(f"mount.cimnfs: mounting {inv.mountpoint} failed: {exc}", file=sys.stderr)
        return EXIT_MOUNT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
