"""The shared, read-only base root file system of the lab hosts (debootstrap, cached)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from nats_lab import cimnfs
from nats_lab.config import LabError, cache_dir
from nats_lab.util import pid_cmdline, require_tools, run, say

# Bump when the configuration below changes in a way the hash would not see.
RECIPE_VERSION = 1
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "python3-apt",
    "iproute2",
    "iputils-ping",
    "sudo",
    "procps",
    "ca-certificates",
    "curl",
    "acl",
    "fuse3",
    "libfuse2",
    "python3-fusepy",
    # For the lab's monitoring host (roles/nats_monitoring installs them where apt can reach
    # Debian; lab hosts cannot). Disabled in the base: only the role enables them.
    "prometheus",
    "prometheus-blackbox-exporter",
)
# Units the base installs but no host runs until a role enables it.
DISABLED_UNITS = ("prometheus.service", "prometheus-blackbox-exporter.service")
MOUNT_HELPER = "usr/sbin/mount.cimnfs"
EXPORT_DIR = "srv/cimstor-export"
# Units that would wake up in a lab host and reach for the network or disturb tests.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "apt-daily.service",
    "apt-daily-upgrade.service",
    "systemd-networkd-wait-online.service",
)
SSHD_CONFIG = """\
# Lab hosts get only an ed25519 host key (written per host by nats-lab).
HostKey /etc/ssh/ssh_host_ed25519_key
UseDNS no
"""
SUDOERS = "ansible ALL=(ALL:ALL) NOPASSWD: ALL\n"


def recipe_hash() -> str:
    """Everything that goes into the base; a change gives a new cache entry."""
    recipe = {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "mirror": MIRROR,
        "packages": PACKAGES,
        "masked": MASKED_UNITS,
        "disabled": DISABLED_UNITS,
        "sshd": SSHD_CONFIG,
        "sudoers": SUDOERS,
        "helper": Path(cimnfs.__file__).read_bytes().decode(),
    }
    blob = json.dumps(recipe, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def base_path() -> Path:
    return cache_dir() / f"base-{recipe_hash()}"


def rootfs(base: Path) -> Path:
    return base / "rootfs"


def bootstrap_hash() -> str:
    """The debootstrap stage depends on the package set only."""
    blob = json.dumps([RECIPE_VERSION, SUITE, MIRROR, PACKAGES]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def ensure_base(*, keep: set[Path] | None = None) -> Path:
    """Return the cached base for the current recipe, building it if needed.

    Two cached stages: the plain debootstrap result (slow, changes with the package list)
    and the configured base (seconds, changes with the helper or the configuration).
    """
    base = base_path()
    if (rootfs(base) / "etc/os-release").exists():
        say(f"base: cached {base}")
        return base
    require_tools("debootstrap", "chroot", "cp")
    cache_dir().mkdir(parents=True, exist_ok=True)
    stage = _ensure_bootstrap()
    # Build next to the final place and rename: an interrupted build leaves no half image.
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir()))
    try:
        say("base: copying the debootstrap stage")
        run(["cp", "-a", "--reflink=auto", str(rootfs(stage)), str(rootfs(tmp))])
        _configure(rootfs(tmp))
        (tmp / "recipe.json").write_text(json.dumps({"packages": PACKAGES}) + "\n")
        tmp.chmod(0o755)
        tmp.rename(base)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"base: ready at {base}")
    _prune(keep={base, stage, *(keep or set())})
    return base


def _ensure_bootstrap() -> Path:
    stage = cache_dir() / f"debootstrap-{bootstrap_hash()}"
    if (rootfs(stage) / "etc/os-release").exists():
        return stage
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir()))
    try:
        _debootstrap(rootfs(tmp))
        # The downloaded .debs are not needed in the hosts (they have no route to a mirror).
        for deb in (rootfs(tmp) / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        tmp.chmod(0o755)
        tmp.rename(stage)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stage


def _in_use() -> set[str]:
    """Cache entries some running process (an nspawn of any checkout's lab) refers to."""
    used: set[str] = set()
    prefix = str(cache_dir()) + "/"
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            for arg in pid_cmdline(int(proc.name)):
                for part in arg.split(prefix)[1:]:
                    used.add(part.split("/")[0])
    return used


def _prune(keep: set[Path]) -> None:
    """Drop older bases and leftovers of interrupted builds, unless a lab still uses them."""
    used = _in_use()
    for entry in cache_dir().iterdir():
        if entry in keep or entry.name in used:
            continue
        if entry.name.startswith(("base-", "debootstrap-", ".build-")):
            say(f"base: removing old {entry.name}")
            shutil.rmtree(entry, ignore_errors=True)


def _debootstrap(root: Path) -> None:
    say(f"base: debootstrap {SUITE} ({len(PACKAGES)} extra packages), takes about a minute")
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(root),
        MIRROR,
    ]
    log_path = root.parent / "debootstrap.log"
    with (
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc,
        log_path.open("w") as log,
    ):
        assert proc.stdout is not None
        counts: dict[str, int] = {}
        for line in proc.stdout:
            log.write(line)
            verb = line.split()[1] if line.startswith("I: ") and len(line.split()) > 1 else ""
            if verb in ("Retrieving", "Validating", "Extracting", "Unpacking", "Configuring"):
                counts[verb] = counts.get(verb, 0) + 1
                if counts[verb] % 40 == 1:
                    say(f"base:   {verb.lower()} packages ({counts[verb]} so far)")
            elif line.startswith(("I: ", "E: ", "W: ")):
                say(f"base:   {line[3:].strip()}")
        rc = proc.wait()
    if rc != 0:
        raise LabError(f"debootstrap failed ({rc}); see {log_path}")


def _configure(root: Path) -> None:
    say("base: configuring (ansible user, networkd, ssh, FUSE helper)")

    def chroot(*argv: str) -> None:
        run(["chroot", str(root), *argv])

    chroot("useradd", "--create-home", "--shell", "/bin/bash", "--user-group", "ansible")
    sudoers = root / "etc/sudoers.d/ansible"
    sudoers.write_text(SUDOERS)
    sudoers.chmod(0o440)
    run(["systemctl", f"--root={root}", "enable", "systemd-networkd.service"])
    run(["systemctl", f"--root={root}", "mask", *MASKED_UNITS])
    run(["systemctl", f"--root={root}", "disable", *DISABLED_UNITS])
    # Per-host identity lives in each host's overlay upper dir, never in the shared base.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/ssh/sshd_config.d/lab.conf").write_text(SSHD_CONFIG)
    for ident in ("etc/machine-id", "var/lib/dbus/machine-id", "etc/hostname"):
        (root / ident).unlink(missing_ok=True)
    # An empty /etc/machine-id would be mounted over by systemd; the upper dir has a real one.
    fuse_conf = root / "etc/fuse.conf"
    text = fuse_conf.read_text() if fuse_conf.exists() else ""
    fuse_conf.write_text(text.replace("#user_allow_other", "user_allow_other"))
    if "\nuser_allow_other" not in "\n" + fuse_conf.read_text():
        with fuse_conf.open("a") as out:
            out.write("user_allow_other\n")
    helper = root / MOUNT_HELPER
    shutil.copyfile(cimnfs.__file__, helper)
    helper.chmod(0o755)
    (root / EXPORT_DIR).mkdir(parents=True, exist_ok=True)
