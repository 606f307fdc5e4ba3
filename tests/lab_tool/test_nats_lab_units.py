"""Pure-logic tests of nats-lab: no lab needed."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
import stat
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from nats_lab import cimnfs, cli, faults, hosts, mirror, net
from nats_lab import lab as labmod
from nats_lab.config import Host, Lab, LabError, find_repo, load_lab

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
    line = mirror.sums_line("ab" * 32, "nats-server-v2.99.0-linux-amd64.tar.gz")
    assert line == f"{'ab' * 32}  nats-server-v2.99.0-linux-amd64.tar.gz\n"
    assert mirror.parse_sums(line) == {"nats-server-v2.99.0-linux-amd64.tar.gz": "ab" * 32}


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


def test_exporter_archive_is_flat_like_its_release() -> None:
    archive = mirror.make_exporter_archive(b"exporter-bytes", b"LICENSE TEXT")
    assert archive == mirror.make_exporter_archive(b"exporter-bytes", b"LICENSE TEXT")
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"LICENSE", "prometheus-nats-exporter"}
        assert members["prometheus-nats-exporter"].mode == 0o755
        assert tar.extractfile("prometheus-nats-exporter").read() == b"exporter-bytes"  # type: ignore[union-attr]
    assert mirror.exporter_archive_name("0.12.0") == "prometheus-nats-exporter-v0.12.0-linux-x86_64.tar.gz"


def test_the_mirror_packs_the_exporter_version_the_role_installs() -> None:
    """One version, two readers: the Go module that builds it and the role's default."""
    repo = find_repo()
    installed = yaml.safe_load((repo / "roles/nats_exporter/defaults/main.yml").read_text())["nats_exporter_version"]
    assert mirror.exporter_version(repo) == installed


def test_natscli_archive_is_wrapped_in_its_directory_like_its_release() -> None:
    archive = mirror.make_natscli_archive("9.9.9", b"nats-bytes", b"LICENSE TEXT")
    assert archive == mirror.make_natscli_archive("9.9.9", b"nats-bytes", b"LICENSE TEXT")
    top = "nats-9.9.9-linux-amd64"
    with zipfile.ZipFile(io.BytesIO(archive)) as zipped:
        members = {info.filename: info for info in zipped.infolist()}
        assert set(members) == {f"{top}/LICENSE", f"{top}/README.md", f"{top}/nats"}
        assert members[f"{top}/nats"].external_attr >> 16 == stat.S_IFREG | 0o755
        assert members[f"{top}/LICENSE"].external_attr >> 16 == stat.S_IFREG | 0o644
        assert {info.date_time for info in members.values()} == {time.gmtime(mirror.ARCHIVE_MTIME)[:6]}
        assert zipped.read(f"{top}/nats") == b"nats-bytes"
        assert zipped.read(f"{top}/LICENSE") == b"LICENSE TEXT"
        assert "natscli v9.9.9" in zipped.read(f"{top}/README.md").decode()
    assert mirror.natscli_archive_name("0.5.0") == "nats-0.5.0-linux-amd64.zip"


def test_natscli_is_packed_beside_its_sha256sums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = tmp_path / "build" / "nats"
    built.parent.mkdir()
    built.write_bytes(b"nats-bytes")
    monkeypatch.setattr(mirror, "natscli_binary", lambda version: built)
    mirror._pack_natscli(tmp_path / "tree", "0.5.0", b"license")
    out = tmp_path / "tree" / "natscli" / "v0.5.0"
    assert sorted(p.name for p in out.iterdir()) == ["SHA256SUMS", "nats-0.5.0-linux-amd64.zip"]
    archive = (out / "nats-0.5.0-linux-amd64.zip").read_bytes()
    assert archive == mirror.make_natscli_archive("0.5.0", b"nats-bytes", b"license")
    digest = hashlib.sha256(archive).hexdigest()
    assert (out / "SHA256SUMS").read_text() == f"{digest}  nats-0.5.0-linux-amd64.zip\n"


def test_packing_natscli_before_it_is_built_names_the_make_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mirror, "natscli_binary", lambda version: tmp_path / "absent" / "nats")
    with pytest.raises(LabError, match="make natscli"):
        mirror._pack_natscli(tmp_path / "tree", "0.5.0", b"license")


def test_natscli_version_is_read_from_clients_natscli_mk(tmp_path: Path) -> None:
    makefile = tmp_path / "clients" / "natscli.mk"
    makefile.parent.mkdir()
    makefile.write_text("GO ?= go\nNATSCLI_VERSION := v1.2.3\n")
    assert mirror.natscli_version(tmp_path) == "1.2.3"
    makefile.write_text("NATSCLI_VERSION := latest\n")
    with pytest.raises(LabError, match="NATSCLI_VERSION"):
        mirror.natscli_version(tmp_path)


def test_the_mirror_packs_the_natscli_version_the_role_installs() -> None:
    """One version, two readers: the make target that builds it and the role's default."""
    repo = find_repo()
    installed = yaml.safe_load((repo / "roles/natscli/defaults/main.yml").read_text())["natscli_version"]
    assert mirror.natscli_version(repo) == installed


def test_a_new_natscli_version_is_a_new_mirror_tree() -> None:
    versions = ("2.99.0", "2.98.0")
    assert mirror.recipe_hash(versions, "0.12.0", "0.5.0") != mirror.recipe_hash(versions, "0.12.0", "0.5.1")
    assert mirror.recipe_hash(versions, "0.12.0", "0.5.0") != mirror.recipe_hash(
        ("2.99.1", "2.98.0"), "0.12.0", "0.5.0"
    )


def test_the_mirror_serves_the_version_the_shared_cluster_settings_pin(tmp_path: Path) -> None:
    settings = tmp_path / mirror.SERVER_SETTINGS
    settings.parent.mkdir(parents=True)
    settings.write_text('nats_server_version: "9.8.7"\n')
    assert mirror.server_versions(tmp_path) == ("9.8.7", mirror.OTHER_VERSION)
    settings.write_text("nats_server_jetstream_domain: x\n")
    with pytest.raises(LabError, match="no nats_server_version"):
        mirror.server_version(tmp_path)
    # The lab reads phx's file (one shared cluster.yml), so both deploy what the mirror serves.
    repo = find_repo()
    assert (repo / mirror.SERVER_SETTINGS).resolve() == (repo / "inventory/phx/group_vars/nats_cluster/cluster.yml")


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


def test_only_the_backup_host_sees_the_checkout_and_its_python(tmp_path: Path) -> None:
    repo = tmp_path / "checkout"
    shutil.copytree(find_repo() / "inventory/lab", repo / "inventory/lab")
    (repo / ".venv").mkdir()
    (repo / ".venv/pyvenv.cfg").write_text("home = /opt/python-3.11/bin\ninclude-system-site-packages = false\n")
    lab = load_lab(repo)
    assert lab.backup_hosts == {"monitor-1"} and lab.host_marker == "/etc/cim-nats-lab-host"
    assert hosts.checkout_binds(lab) == [repo, Path("/opt/python-3.11")]
    argv = {host.name: hosts.nspawn_argv(lab, host, tmp_path / "base") for host in lab.machines}
    binds = [f"--bind-ro={repo}", "--bind-ro=/opt/python-3.11"]
    assert [a for a in argv["monitor-1"] if a.startswith("--bind-ro=")] == binds
    assert not [a for name in ("nats-1", "nats-2", "nats-3") for a in argv[name] if a.startswith("--bind-ro=")]


def test_a_backup_host_outside_the_lab_is_refused(tmp_path: Path) -> None:
    shutil.copytree(find_repo() / "inventory/lab", tmp_path / "inventory/lab")
    hosts_file = tmp_path / "inventory/lab/hosts.yml"
    hosts_file.write_text(
        hosts_file.read_text().replace(
            "    nats_backup_host:\n      hosts:\n        monitor-1:",
            "    nats_backup_host:\n      hosts:\n        ops-9:",
        )
    )
    with pytest.raises(LabError, match="nats_backup_host names ops-9, not a lab machine"):
        load_lab(tmp_path)


def test_a_bound_path_under_a_closed_directory_is_made_reachable(tmp_path: Path) -> None:
    image, upper = tmp_path / "image", tmp_path / "upper"
    (image / "root").mkdir(parents=True, mode=0o700)
    (image / "root").chmod(0o700)
    (image / "opt").mkdir(mode=0o755)
    upper.mkdir()
    hosts._traversable_like(image, upper, Path("/root/.pyenv/versions/3.11.7"))
    hosts._traversable_like(image, upper, Path("/opt/cim-nats-infra"))
    # Only the closed directory the image has is opened, for entering (o+x), not for listing.
    assert (upper / "root").stat().st_mode & 0o7777 == 0o701
    assert not (upper / "root/.pyenv").exists() and not (upper / "opt").exists()


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


# --- power-loss: recorded, ordered and healed without a lab ----------------------------------
@pytest.fixture
def fake_lab(tmp_path: Path) -> Lab:
    """The lab's layout with its state dir in tmp (nothing of the real .lab/ is touched)."""
    lab = dataclasses.replace(load_lab(find_repo()), repo=tmp_path)
    lab.state.mkdir()
    return lab


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch, fake_lab: Lab) -> list[tuple[str, Any]]:
    """Hosts that 'run' (pids made up) and a log of what the fault does to them, in order."""
    events: list[tuple[str, Any]] = []
    pids = {h.name: 1000 * (i + 1) for i, h in enumerate(fake_lab.hosts)}
    down: set[str] = set()
    monkeypatch.setattr(hosts, "init_pid", lambda lab, h: None if h.name in down else pids[h.name] + 1)
    monkeypatch.setattr(hosts, "launcher_pid", lambda lab, h: None if h.name in down else pids[h.name])
    monkeypatch.setattr(faults, "fuse_daemons", lambda h: [pids[h.name] + 50])

    def freeze(host: Host, frozen: bool) -> bool:
        events.append(("freeze" if frozen else "thaw", host.name))
        return True

    monkeypatch.setattr(faults, "freeze", freeze)

    def kill(pid: int, sig: int) -> None:
        events.append(("kill", pid))
        for name, base in pids.items():
            if pid == base + 1:
                down.add(name)

    monkeypatch.setattr(faults, "kill", kill)
    monkeypatch.setattr(faults, "wait_gone", lambda pids, timeout: [])
    return events


def test_power_loss_of_the_site_kills_every_fuse_daemon_before_any_host(
    fake_lab: Lab, machine: list[tuple[str, Any]]
) -> None:
    message = faults.power_loss(fake_lab, list(fake_lab.hosts))
    names = [h.name for h in fake_lab.hosts]
    assert "power cut on nats-1, nats-2, nats-3 at once" in message
    assert machine == [
        *(("freeze", n) for n in names),
        ("kill", 1050),
        ("kill", 2050),
        ("kill", 3050),
        ("kill", 1001),
        ("kill", 2001),
        ("kill", 3001),
        *(("thaw", n) for n in names),
    ]
    recorded = faults.load(fake_lab)
    assert sorted(recorded) == names
    for i, name in enumerate(names):
        detail = recorded[name]["power-loss"]
        assert detail["init_pid"] == 1000 * (i + 1) + 1
        assert detail["fuse_daemons"] == [1000 * (i + 1) + 50]
        assert detail["site"] is True
    # Down hosts are skipped, and other faults refused until heal.
    assert "already down" in faults.power_loss(fake_lab, list(fake_lab.hosts))
    with pytest.raises(LabError, match="nats-1 has lost power; run first: nats-lab heal nats-1"):
        faults.inject(fake_lab, "stop", fake_lab.hosts[0])
    assert faults.down_kinds(fake_lab, fake_lab.hosts[0]) == ["power-loss"]


def test_power_loss_of_one_host_leaves_the_others(fake_lab: Lab, machine: list[tuple[str, Any]]) -> None:
    target = fake_lab.hosts[1]
    assert "power cut on nats-2:" in faults.inject(fake_lab, "power-loss", target)
    assert machine == [("freeze", "nats-2"), ("kill", 2050), ("kill", 2001), ("thaw", "nats-2")]
    assert faults.load(fake_lab) == {
        "nats-2": {"power-loss": {"init_pid": 2001, "fuse_daemons": [2050], "site": False, "at": mock.ANY}}
    }
    # With one host down already, `all` cuts the rest and says so.
    machine.clear()
    message = faults.power_loss(fake_lab, list(fake_lab.hosts))
    assert "nats-1, nats-3 at once (nats-2 already down)" in message
    assert ("kill", 2001) not in machine


def test_power_loss_refuses_a_host_that_is_not_running(
    fake_lab: Lab, machine: list[tuple[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hosts, "init_pid", lambda lab, h: None)
    with pytest.raises(LabError, match="nats-1 is not running"):
        faults.power_loss(fake_lab, list(fake_lab.hosts))
    assert machine == [] and faults.load(fake_lab) == {}


def test_heal_brings_power_back_to_every_host_at_once(
    fake_lab: Lab, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    names = [h.name for h in fake_lab.hosts]
    state = {n: {"power-loss": {"init_pid": 1, "site": True}, "stale-storage": {"mounts": ["/m"]}} for n in names}
    faults.save(fake_lab, state)
    events: list[tuple[str, str]] = []
    monkeypatch.setattr(hosts, "start", lambda lab, h, base: events.append(("start", h.name)))

    def wait_booted(lab: Lab, host: Host) -> hosts.BootResult:
        events.append(("booted", host.name))
        return hosts.BootResult(host, "running", (), 1.5)

    monkeypatch.setattr(hosts, "wait_booted", wait_booted)
    monkeypatch.setattr(faults, "cimnfs_mounts", lambda lab, h: ["/mnt/cimstor-jetstream"])
    done = faults.heal(fake_lab, list(fake_lab.hosts), fake_lab.repo)
    # Every host is started before the first one is waited for: the power comes back everywhere.
    assert events[:3] == [("start", n) for n in names]
    assert [e for e in events if e[0] == "booted"] == [("booted", n) for n in names]
    assert done == [
        f"{n}: power back, booted again (running, 1.5s); share mounted: /mnt/cimstor-jetstream" for n in names
    ]
    # The boot cleared the stale flags too (they live in /run): nothing is left to heal.
    assert faults.load(fake_lab) == {}
    assert "power back" in capsys.readouterr().out


def test_destroy_removes_the_host_and_its_store_for_good(
    fake_lab: Lab, machine: list[tuple[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(faults, "apply_network", lambda lab, recorded: machine.append(("network", sorted(recorded))))
    monkeypatch.setattr(hosts, "remove_cgroups", lambda h: machine.append(("cgroups", h.name)))
    for name in ("nats-1", "nats-2"):
        (fake_lab.host_dir(fake_lab.host(name)) / "upper/etc").mkdir(parents=True)
        (fake_lab.share_dir / name / "jetstream").mkdir(parents=True)
    faults.save(fake_lab, {"nats-2": {"isolate": {"veth": "vb-nats-2"}}})
    target = fake_lab.host("nats-2")
    message = faults.inject(fake_lab, "destroy", target)
    assert message.startswith("destroyed nats-2:") and "JetStream directory" in message and "removed" in message
    # Recorded (its other faults ended) before the kill; then its disk and its store are gone.
    assert machine == [("network", ["nats-2"]), ("kill", 2001), ("cgroups", "nats-2")]
    assert faults.load(fake_lab) == {"nats-2": {"destroy": {}}}
    assert not fake_lab.host_dir(target).exists() and not (fake_lab.share_dir / "nats-2").exists()
    assert (fake_lab.host_dir(fake_lab.host("nats-1")) / "upper/etc").is_dir()
    assert (fake_lab.share_dir / "nats-1" / "jetstream").is_dir()
    # Nothing else happens to it, heal does not bring it back, and power-loss passes it by.
    with pytest.raises(LabError, match="nats-2 is destroyed; run first: nats-lab up"):
        faults.inject(fake_lab, "stop", target)
    assert faults.heal(fake_lab, [target], fake_lab.repo) == [
        "nats-2: destroyed for good, not healed; `nats-lab up` creates it again, new and empty"
    ]
    assert faults.load(fake_lab) == {"nats-2": {"destroy": {}}}
    assert faults.inject(fake_lab, "destroy", target) == "nats-2 is already destroyed"
    assert "(nats-2 already down)" in faults.power_loss(fake_lab, list(fake_lab.hosts))
    # `up` forgets the record and creates the host again.
    assert faults.forget_destroyed(fake_lab) == [target]
    assert "nats-2" not in faults.load(fake_lab)


def test_heal_order_boots_a_host_before_its_storage_or_service() -> None:
    order = faults.HEAL_ORDER
    assert set(order) == set(faults.KINDS)
    for network in ("isolate", "cut-routes"):  # ssh must reach the host to see it booted
        assert order.index(network) < order.index("power-loss")
    for needs_host in ("stale-storage", "stop"):
        assert order.index("power-loss") < order.index(needs_host)
        assert order.index("kill") < order.index(needs_host)


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A checkout with only the lab inventory, for `nats-lab --repo` (its .lab/ is in tmp)."""
    inventory = find_repo() / "inventory/lab"
    shutil.copytree(inventory, tmp_path / "inventory/lab")
    return tmp_path


def test_cli_power_loss_all_targets_every_host(repo_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(cli, "require_root", lambda: None)

    def power_loss(lab: Lab, targets: list[Host]) -> str:
        calls.append([h.name for h in targets])
        return "cut"

    monkeypatch.setattr(labmod, "require_up", lambda lab, host: calls.append(["up", host.name]))
    monkeypatch.setattr(faults, "power_loss", power_loss)
    assert cli.main(["--repo", str(repo_copy), "fault", "power-loss", "all"]) == 0
    assert calls == [["up", "nats-1"], ["up", "nats-2"], ["up", "nats-3"], ["nats-1", "nats-2", "nats-3"]]
    calls.clear()
    assert cli.main(["--repo", str(repo_copy), "fault", "power-loss", "nats-3"]) == 0
    assert calls == [["up", "nats-3"], ["nats-3"]]


def test_cli_all_is_for_power_loss_only(
    repo_copy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "require_root", lambda: None)
    assert cli.main(["--repo", str(repo_copy), "fault", "stop", "all"]) == 1
    assert "'all' is for power-loss only" in capsys.readouterr().err
    assert "power-loss" in cli._parser().format_help()


def test_status_shows_a_host_without_power() -> None:
    host = {"name": "nats-2", "address": "10.231.20.12", "running": False, "init_pid": None, "ssh": False}
    data = {
        "bridge": {"name": "br-cimlab", "exists": True, "up": True, "address": "10.231.20.1/24"},
        "mirror": {"running": True, "listening": True, "url": "http://10.231.20.1:8088"},
        "hosts": [{**host, "system": None, "nats_server": None, "faults": ["power-loss"]}],
        "up": False,
    }
    row = next(line for line in labmod.format_status(data).splitlines() if line.startswith("nats-2"))
    assert row.split()[2] == "stopped" and row.split()[-1] == "power-loss"
