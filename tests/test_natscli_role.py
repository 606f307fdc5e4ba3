"""roles/natscli through playbooks/natscli.yml, for real on the controller: from a release laid out
like natscli's (the lab mirror's zip around the binary `make natscli` builds, and SHA256SUMS),
into tmp_path. It installs the pinned version and `nats --version` says so; a second run and
--check change nothing; --check on a fresh controller writes nothing; an archive that fails its
checksum, or a binary of another version, is refused and leaves no `nats`; bad settings are
refused in one short line before anything is touched or fetched.

Offline (tests/offline.py): the run's own empty network, where the only server is the test's
release tree on its loopback, and an ssh that refuses and records. The inventory is phx's, as
operators run it (its `ansible_become` must not reach the controller's play).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from nats_lab import mirror
from tests.helpers import BIN, LAB_INVENTORY, PHX_INVENTORY, REPO, missing_in_ci_fails, role_defaults
from tests.offline import LOCAL_WEB_URL, OfflineRun, assert_one_short_refusal, run_offline_serving

VERSION = mirror.natscli_version(REPO)
ARCHIVE = mirror.natscli_archive_name(VERSION)
FIRST_INSTALL_TASK = "Install | create the release and command directories"
# Stand-ins where the real binary is not the point: a `nats` that answers --version only.
FAKE_NATS = "#!/bin/sh\necho v{version}\n"
SOUND_DIR = "sound"
TAMPERED_DIR = "tampered"
OTHER_VERSION_DIR = "other-version"


def publish(directory: Path, binary: bytes) -> None:
    """<directory>/v<VERSION>/ as the release has it: the mirror's zip around `binary`, its SHA256SUMS."""
    out = directory / f"v{VERSION}"
    out.mkdir(parents=True)
    archive = mirror.make_natscli_archive(VERSION, binary, (REPO / "LICENSE").read_bytes())
    (out / ARCHIVE).write_bytes(archive)
    (out / mirror.SUMS_NAME).write_text(mirror.sums_line(hashlib.sha256(archive).hexdigest(), ARCHIVE))


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pinned release around the real binary (built by `make natscli`)."""
    binary = mirror.natscli_binary(VERSION)
    if not binary.is_file():
        missing_in_ci_fails(f"{binary} is missing: build it with `make natscli`")
    tree = tmp_path_factory.mktemp("natscli-release")
    publish(tree, binary.read_bytes())
    return tree


@pytest.fixture(scope="module")
def fake_releases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Around stand-ins: <tree>/sound/ a good release; <tree>/tampered/ an archive changed after its
    SHA256SUMS was written; <tree>/other-version/ a good archive whose `nats` reports another version."""
    tree = tmp_path_factory.mktemp("natscli-fake-releases")
    sound = FAKE_NATS.format(version=VERSION).encode()
    publish(tree / SOUND_DIR, sound)
    publish(tree / TAMPERED_DIR, sound)
    tampered = tree / TAMPERED_DIR / f"v{VERSION}" / ARCHIVE
    tampered.write_bytes(mirror.make_natscli_archive(VERSION, sound + b"# tampered\n", b"license"))
    publish(tree / OTHER_VERSION_DIR, FAKE_NATS.format(version="0.4.0").encode())
    return tree


@dataclass(frozen=True)
class Install:
    run: OfflineRun
    requests: list[str]  # the paths the run asked the release tree for
    install_dir: Path
    bin_dir: Path

    @property
    def changed(self) -> int:
        found = re.search(r"^localhost\s+: ok=\d+\s+changed=(\d+)", self.run.output, re.MULTILINE)
        assert found, self.run.output[-3000:]
        return int(found.group(1))


def install(
    tree: Path, directory: Path, *args: str, base_url: str | None = LOCAL_WEB_URL, inventory: Path = PHX_INVENTORY
) -> Install:
    """playbooks/natscli.yml with the phx inventory, the release from `tree` (base_url None: the
    inventory's), its directories in `directory`."""
    install_dir, bin_dir = directory / "lib" / "natscli", directory / "bin"
    requests = directory / f"requests-{len(list(directory.glob('requests-*')))}.log"
    argv = [str(BIN / "ansible-playbook"), "-i", str(inventory), str(REPO / "playbooks" / "natscli.yml")]
    argv += ["-e", f"natscli_release_base_url={base_url}"] if base_url else []
    argv += ["-e", f"natscli_install_dir={install_dir}", "-e", f"natscli_bin_dir={bin_dir}", *args]
    run = run_offline_serving(tree, requests, argv, directory)
    assert run.ssh_calls == [], "the controller's install connected to a host"
    return Install(run, requests.read_text().splitlines(), install_dir, bin_dir)


@pytest.fixture(scope="module")
def installed(release: Path, tmp_path_factory: pytest.TempPathFactory) -> Install:
    first = install(release, tmp_path_factory.mktemp("natscli-installed"))
    assert first.run.result.returncode == 0, first.run.output[-4000:]
    return first


def test_the_role_pins_the_version_clients_natscli_mk_builds() -> None:
    """One version, two places: the make target the tests and the lab's mirror build, and the role."""
    assert role_defaults("natscli")["natscli_version"] == VERSION


def test_nats_is_the_pinned_release_from_its_verified_archive(installed: Install) -> None:
    release_dir = installed.install_dir / VERSION
    assert installed.changed > 0
    assert installed.requests == [f"/v{VERSION}/{mirror.SUMS_NAME}", f"/v{VERSION}/{ARCHIVE}"]
    # Only the binary, out of the wrapping directory, beside its archive.
    assert sorted(p.name for p in release_dir.iterdir()) == sorted([ARCHIVE, "nats"])
    command = installed.bin_dir / "nats"
    assert command.is_symlink() and os.readlink(command) == str(release_dir / "nats")
    assert os.access(command, os.X_OK)
    reported = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=30, check=True)
    assert reported.stdout.strip().removeprefix("v") == VERSION


def test_a_second_run_changes_nothing_and_downloads_only_the_checksums(installed: Install, release: Path) -> None:
    again = install(release, installed.install_dir.parent.parent)
    assert again.run.result.returncode == 0, again.run.output[-4000:]
    assert again.changed == 0, again.run.output[-4000:]
    assert again.requests == [f"/v{VERSION}/{mirror.SUMS_NAME}"]


def test_check_after_the_install_changes_nothing(installed: Install, release: Path) -> None:
    checked = install(release, installed.install_dir.parent.parent, "--check", "--diff")
    assert checked.run.result.returncode == 0, checked.run.output[-4000:]
    assert checked.changed == 0, checked.run.output[-4000:]
    assert "Install | refuse a nats that is not the pinned version" in checked.run.output


def test_check_on_a_fresh_controller_writes_and_fetches_nothing(release: Path, tmp_path: Path) -> None:
    checked = install(release, tmp_path, "--check")
    assert checked.run.result.returncode == 0, checked.run.output[-4000:]
    assert checked.changed > 0
    assert not (tmp_path / "lib").exists() and not (tmp_path / "bin").exists()
    assert checked.requests == []


def test_check_with_the_archive_but_not_its_binary_changes_nothing(fake_releases: Path, tmp_path: Path) -> None:
    """A run stopped between the download and the unpack: --check neither unpacks nor fails."""
    sound = f"{LOCAL_WEB_URL}/{SOUND_DIR}"
    assert install(fake_releases, tmp_path, base_url=sound).run.result.returncode == 0
    unpacked = tmp_path / "lib" / "natscli" / VERSION / "nats"
    unpacked.unlink()
    checked = install(fake_releases, tmp_path, "--check", base_url=sound)
    assert checked.run.result.returncode == 0, checked.run.output[-4000:]
    assert checked.changed == 1, checked.run.output[-4000:]
    assert not unpacked.exists()


def test_an_archive_that_fails_its_checksum_is_refused_and_leaves_no_binary(
    fake_releases: Path, tmp_path: Path
) -> None:
    refused = install(fake_releases, tmp_path, base_url=f"{LOCAL_WEB_URL}/{TAMPERED_DIR}")
    assert refused.run.result.returncode != 0
    assert "did not match" in refused.run.output, refused.run.output[-3000:]
    assert f"/{TAMPERED_DIR}/v{VERSION}/{ARCHIVE}" in refused.requests
    assert not (refused.bin_dir / "nats").is_symlink()
    assert list((refused.install_dir / VERSION).iterdir()) == []
    assert_one_short_refusal(refused.run.output)


def test_a_nats_of_another_version_is_refused_in_one_line_and_never_linked(fake_releases: Path, tmp_path: Path) -> None:
    refused = install(fake_releases, tmp_path, base_url=f"{LOCAL_WEB_URL}/{OTHER_VERSION_DIR}")
    output = " ".join(refused.run.output.split())
    assert refused.run.result.returncode != 0
    unpacked = refused.install_dir / VERSION / "nats"
    assert f'natscli_version {VERSION}: {unpacked} reports "v0.4.0"' in output, output[-3000:]
    assert_one_short_refusal(refused.run.output)
    # Checked before the link: the `nats` on PATH is never the wrong one.
    assert not (refused.bin_dir / "nats").is_symlink()


REFUSALS: dict[str, tuple[list[str], str]] = {
    "version with its v": (
        ["-e", "natscli_version=v0.5.0"],
        'natscli_version "v0.5.0" must be a release as X.Y.Z (e.g. 0.5.0, without the v)',
    ),
    "version not pinned": (["-e", "natscli_version=latest"], 'natscli_version "latest" must be a release as X.Y.Z'),
    "version a number": (["-e", '{"natscli_version": 0.5}'], 'natscli_version "0.5" must be a release as X.Y.Z'),
    "release URL over ftp": (
        ["-e", "natscli_release_base_url=ftp://mirror.example/natscli"],
        'natscli_release_base_url "ftp://mirror.example/natscli" must be an http:// or https:// URL',
    ),
    "release URL without a scheme": (
        ["-e", "natscli_release_base_url=github.com/nats-io/natscli/releases/download"],
        'natscli_release_base_url "github.com/nats-io/natscli/releases/download" must be an http:// or https:// URL',
    ),
    "release URL a list": (
        ["-e", '{"natscli_release_base_url": ["http://a", "http://b"]}'],
        "must be an http:// or https:// URL",
    ),
    "install directory relative": (
        ["-e", "natscli_install_dir=lib/natscli"],
        'natscli_install_dir "lib/natscli" must be an absolute path (~ is not expanded)',
    ),
    "command directory under ~": (
        ["-e", "natscli_bin_dir=~/.local/bin"],
        'natscli_bin_dir "~/.local/bin" must be an absolute path (~ is not expanded)',
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_settings_are_refused_before_anything_is_touched(case: str, tmp_path: Path) -> None:
    args, expected = REFUSALS[case]
    # An empty release tree: whatever the run asked for, it would be in the requests.
    empty = tmp_path / "release"
    empty.mkdir()
    refused = install(empty, tmp_path, *args)
    output = " ".join(refused.run.output.split())
    assert refused.run.result.returncode != 0, output[-2000:]
    assert expected in output, output[-3000:]
    assert FIRST_INSTALL_TASK not in output
    assert_one_short_refusal(refused.run.output)
    assert refused.requests == []
    assert not (tmp_path / "lib").exists() and not (tmp_path / "bin").exists()


def test_the_labs_mirror_is_not_asked_while_the_lab_is_down(tmp_path: Path) -> None:
    """The lab inventory fetches from its mirror on the lab's bridge. In the run's own network
    there is no bridge, as on a machine whose lab is down: refused before any request, where
    the mirror's address would otherwise have routed off the machine."""
    empty = tmp_path / "release"
    empty.mkdir()
    refused = install(empty, tmp_path, base_url=None, inventory=LAB_INVENTORY)
    output = " ".join(refused.run.output.split())
    assert refused.run.result.returncode != 0, output[-2000:]
    assert "lab_bridge_name br-cimlab: no such interface, the lab is down (make lab-up)" in output, output[-3000:]
    assert FIRST_INSTALL_TASK not in output
    assert_one_short_refusal(refused.run.output)
    assert refused.requests == []
