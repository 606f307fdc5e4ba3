"""Pure-logic tests of nats-lab: no lab needed."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from nats_lab import cimnfs, cli, mirror, net
from nats_lab.config import LabError, find_repo, load_lab

PRODUCTION_NFS_OPTIONS = "rw,hard,noatime,nfsvers=4.2,timeo=600,retrans=2,_netdev"


def test_production_nfs_options_are_accepted() -> None:
    opts = cimnfs.parse_options(PRODUCTION_NFS_OPTIONS)
    assert opts.fuse_flags == ("noatime",)
    assert set(opts.ignored) == {"hard", "nfsvers=4.2", "timeo=600", "retrans=2", "_netdev"}
    assert not opts.read_only


@pytest.mark.parametrize(
    "text",
    [
        "soft,vers=4.1,proto=tcp,nofail,x-systemd.automount,x-systemd.mount-timeout=30",
        "defaults,rsize=1048576,wsize=1048576,sec=sys,actimeo=0,lookupcache=none",
    ],
)
def test_other_nfs_and_systemd_options_are_ignored(text: str) -> None:
    opts = cimnfs.parse_options(text)
    assert opts.fuse_flags == ()
    assert len(opts.ignored) == len(text.split(","))


def test_ro_is_honoured_and_last_of_rw_ro_wins() -> None:
    assert cimnfs.parse_options("ro,hard").fuse_flags == ("ro",)
    assert cimnfs.parse_options("ro,rw").read_only is False
    assert cimnfs.parse_options("rw,ro").read_only is True
    assert cimnfs.parse_options("nosuid,nodev,noexec").fuse_flags == ("nosuid", "nodev", "noexec")


def test_unknown_option_is_an_error_unless_sloppy() -> None:
    with pytest.raises(cimnfs.OptionError, match="bogus"):
        cimnfs.parse_options("rw,bogus")
    assert cimnfs.parse_options("rw,bogus", sloppy=True).ignored == ("bogus",)


def test_mount_helper_argv_as_mount8_passes_it() -> None:
    inv = cimnfs.parse_argv(["cimstor:/srv/cimstor-export/n1", "/mnt/x", "-s", "-o", PRODUCTION_NFS_OPTIONS])
    assert inv.source == "cimstor:/srv/cimstor-export/n1"
    assert inv.mountpoint == "/mnt/x"
    assert inv.options == PRODUCTION_NFS_OPTIONS
    assert inv.sloppy
    assert cimnfs.parse_argv(["a:/b", "/c", "-r"]).options == "ro"
    with pytest.raises(cimnfs.OptionError):
        cimnfs.parse_argv(["only-one"])


def test_backing_dir_is_the_path_after_the_colon() -> None:
    assert cimnfs.backing_dir("cimstor:/srv/cimstor-export") == "/srv/cimstor-export"
    assert cimnfs.backing_dir("cimstor:/srv/cimstor-export/nats-1/") == "/srv/cimstor-export/nats-1"
    assert cimnfs.backing_dir("/plain/path") == "/plain/path"
    with pytest.raises(cimnfs.OptionError):
        cimnfs.backing_dir("cimstor:relative")


def test_stale_flag_is_per_mount_point() -> None:
    assert cimnfs.flag_path("/mnt/a-b") == "/run/cimnfs/%2Fmnt%2Fa-b.stale"
    assert cimnfs.flag_path("/mnt/a/") == cimnfs.flag_path("/mnt/a")
    assert cimnfs.flag_path("/mnt/a_b") != cimnfs.flag_path("/mnt/a/b")
    assert cimnfs.marker_path("/mnt/a").endswith(".mount")


def test_stale_check_compares_flag_time_with_mount_time(tmp_path: Path) -> None:
    mountpoint = "/mnt/test"
    ops = cimnfs.CimNfs(str(tmp_path), mountpoint, mounted_ns=10**18)
    ops.flag = str(tmp_path / "flag")
    ops("statfs", "/")  # no flag: healthy
    Path(ops.flag).touch()
    # A flag older than the mount (set before a remount) leaves the new mount healthy.
    ops.mounted_ns = Path(ops.flag).stat().st_mtime_ns + 1
    ops("statfs", "/")
    ops.mounted_ns = Path(ops.flag).stat().st_mtime_ns
    with pytest.raises(OSError, match="Stale file handle"):
        ops("getattr", "/")
    with pytest.raises(OSError, match="Stale file handle"):
        ops("statfs", "/")  # stays stale


def test_statfs_reports_backing_file_system(tmp_path: Path) -> None:
    ops = cimnfs.CimNfs(str(tmp_path), "/mnt/x", mounted_ns=0)
    ops.flag = str(tmp_path / "no-flag")
    got = ops.statfs("/")
    real = os.statvfs(tmp_path)
    assert got["f_blocks"] == real.f_blocks
    assert got["f_frsize"] == real.f_frsize


def test_sha256sums_format_round_trips() -> None:
    line = mirror.sums_line("ab" * 32, "nats-server-v2.15.1-linux-amd64.tar.gz")
    assert line == f"{'ab' * 32}  nats-server-v2.15.1-linux-amd64.tar.gz\n"
    assert mirror.parse_sums(line) == {"nats-server-v2.15.1-linux-amd64.tar.gz": "ab" * 32}


def test_archive_is_reproducible_and_shaped_like_the_release() -> None:
    first = mirror.make_archive("9.9.9", b"\x7fELF fake", b"license")
    second = mirror.make_archive("9.9.9", b"\x7fELF fake", b"license")
    assert hashlib.sha256(first).digest() == hashlib.sha256(second).digest()
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    top = "nats-server-v9.9.9-linux-amd64"
    assert set(members) == {top, f"{top}/LICENSE", f"{top}/README.md", f"{top}/nats-server"}
    binary = members[f"{top}/nats-server"]
    assert binary.mode == 0o755
    assert (binary.uid, binary.gid, binary.mtime) == (0, 0, mirror.ARCHIVE_MTIME)


def test_two_versions_are_served() -> None:
    assert len(mirror.VERSIONS) >= 2
    assert mirror.VERSIONS[0] == "2.15.1"


def test_nft_ruleset_names_no_reserved_words() -> None:
    lab = load_lab(find_repo())
    rules = net.nft_ruleset(lab.hosts[:1])
    assert f'"{lab.hosts[0].veth}"' in rules
    assert "hook forward" in rules
    assert " fwd " not in rules
    # A cut port: TCP to and from that port on the host's veth, both ways, nothing else.
    cut = net.nft_ruleset([], [(lab.hosts[1], 6222)])
    quoted = f'"{lab.hosts[1].veth}"'
    for way in ("iifname", "oifname"):
        for end in ("dport", "sport"):
            assert f"{way} {quoted} tcp {end} 6222 drop" in cut, cut
    assert "@isolated" not in cut and "hook input" not in cut
    # An empty partition set removes the table altogether.
    assert net.nft_ruleset([]).strip().endswith(f"delete table bridge {net.NFT_TABLE}")


def test_inventory_is_the_source_of_addresses() -> None:
    lab = load_lab(find_repo())
    assert [h.name for h in lab.hosts] == ["nats-1", "nats-2", "nats-3"]
    assert lab.bridge_address == "10.231.20.1"
    assert lab.mirror_url == "http://10.231.20.1:8088"
    assert lab.ssh_key == lab.repo / ".lab/ssh/id_ed25519"
    assert "StrictHostKeyChecking=no" in lab.ssh_common_args
    with pytest.raises(LabError, match="valid hosts: nats-1, nats-2, nats-3"):
        lab.host("nats-9")


def test_cli_unknown_host_lists_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ssh", "nats-9", "--", "true"]) == 1
    err = capsys.readouterr().err
    assert "unknown host 'nats-9'" in err
    assert "nats-1, nats-2, nats-3" in err
    assert "Traceback" not in err


def test_cli_unknown_fault_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["fault", "explode", "nats-1"]) == 1
    err = capsys.readouterr().err
    assert "unknown fault kind 'explode'" in err
    assert "stale-storage" in err
