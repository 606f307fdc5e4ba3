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

This file runs with the Debian python3 inside the lab hosts (stdlib + python3-fusepy), so
it must not import anything from nats_lab; the machine side imports it for the helpers.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

FLAG_DIR = "/run/cimnfs"
FSTYPE = "cimnfs"
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


def parse_options(text: str, *, sloppy: bool = False) -> MountOptions:
    """Split ``-o`` text into options passed to the FUSE mount and options ignored."""
    flags: list[str] = []
    ignored: list[str] = []
    read_only = False
    for raw in text.split(","):
        opt = raw.strip()
        if not opt:
            continue
        key = opt.split("=", 1)[0]
        if opt in PASSTHROUGH_FLAGS:
            if opt in ("ro", "rw"):
                read_only = opt == "ro"
            else:
                flags.append(opt)
        elif opt in IGNORED_FLAGS or ("=" in opt and key in IGNORED_KEYS) or opt.startswith(IGNORED_PREFIXES) or sloppy:
            ignored.append(opt)
        else:
            raise OptionError(f"unknown mount option {opt!r}")
    if read_only:
        flags.append("ro")
    # The last of several atime-style flags wins, as with mount(8): keep the order.
    return MountOptions(fuse_flags=tuple(flags), ignored=tuple(ignored), read_only=read_only)


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


class CimNfs:
    """Passthrough operations for fusepy (raw_fi mode: file ops get the fuse_file_info)."""

    # Times as integer nanoseconds (fusepy reads this attribute).
    use_ns = True

    def __init__(self, root: str, mountpoint: str, mounted_ns: int) -> None:
        self.root = root
        self.flag = flag_path(mountpoint)
        self.mounted_ns = mounted_ns
        self.stale = False
        self.as_root = os.geteuid() == 0

    # fusepy calls operations(op, *args) for every request: one place for the stale check.
    def __call__(self, op: str, *args: Any) -> Any:
        if op not in ("release", "releasedir", "destroy"):
            self._check_stale()
        return getattr(self, op)(*args)

    def _check_stale(self) -> None:
        if not self.stale:
            try:
                flag_mtime = os.stat(self.flag).st_mtime_ns
            except FileNotFoundError:
                return
            self.stale = flag_mtime >= self.mounted_ns
        if self.stale:
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

    # --- metadata -----------------------------------------------------------------------
    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        # fh is the fuse_file_info for fstat(2), or a NULL pointer (falsy) otherwise.
        st = os.fstat(fh.fh) if fh else os.lstat(self._real(path))
        attrs: dict[str, Any] = {key: getattr(st, key) for key in STAT_KEYS}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
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
        os.chmod(self._real(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.lchown(self._real(path), uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        if times is None:
            os.utime(self._real(path), follow_symlinks=False)
        else:
            os.utime(self._real(path), ns=times, follow_symlinks=False)

    def readlink(self, path: str) -> str:
        return os.readlink(self._real(path))

    def truncate(self, path: str, length: int, fh: Any = None) -> None:
        if fh:
            os.ftruncate(fh.fh, length)
        else:
            os.truncate(self._real(path), length)

    # --- names ----------------------------------------------------------------------------
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

    # --- files ----------------------------------------------------------------------------
    def create(self, path: str, mode: int, fi: Any) -> int:
        real = self._real(path)
        fi.fh = os.open(real, fi.flags | os.O_CREAT, mode)
        self._own(real)
        return 0

    def open(self, path: str, fi: Any) -> int:
        fi.fh = os.open(self._real(path), fi.flags)
        return 0

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        return os.pread(fi.fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        return os.pwrite(fi.fh, data, offset)

    def flush(self, path: str, fi: Any) -> None:
        return None

    def fsync(self, path: str, datasync: int, fi: Any) -> None:
        if datasync:
            os.fdatasync(fi.fh)
        else:
            os.fsync(fi.fh)

    def release(self, path: str, fi: Any) -> None:
        os.close(fi.fh)


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


def write_marker(inv: Invocation, mounted_ns: int) -> None:
    os.makedirs(FLAG_DIR, exist_ok=True)
    data = {
        "source": inv.source,
        "mountpoint": os.path.normpath(inv.mountpoint),
        "options": inv.options,
        "mounted_ns": mounted_ns,
    }
    tmp = marker_path(inv.mountpoint) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(data, out)
    os.replace(tmp, marker_path(inv.mountpoint))


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
    write_marker(inv, mounted_ns)
    ops = CimNfs(root, inv.mountpoint, mounted_ns)
    kwargs: dict[str, Any] = {flag: True for flag in opts.fuse_flags}
    try:
        # foreground=False: libfuse mounts first, then daemonizes, so mount(8) returns
        # once the file system is there (or fails with the mount error).
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
            attr_timeout=0,
            entry_timeout=0,
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
