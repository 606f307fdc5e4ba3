"""The backup and restore runbooks refuse bad requests in one short line before any host or the
cluster is contacted, and the scheduled job's units pass `systemd-analyze verify`.

Runs offline (tests/offline.py: an empty network and an ssh that refuses and records), against a
copy of the lab inventory; the units are rendered into a temporary directory, never installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import BIN, REPO, missing_in_ci_fails
from tests.offline import assert_one_short_refusal, make_inventory, run_offline, run_offline_playbook

BACKUP, RESTORE = "backup-streams.yml", "remediate/restore-streams.yml"

CASES: dict[str, tuple[str, list[str], str]] = {
    "keep no set": (
        BACKUP,
        ["-e", "jetstream_backup_keep=0"],
        "jetstream_backup_keep 0 must be a whole number of at least 1",
    ),
    "keep a word": (
        BACKUP,
        ["-e", "jetstream_backup_keep=many"],
        "jetstream_backup_keep (a str) must be a whole number",
    ),
    "backup dir on the share": (
        BACKUP,
        ["-e", "jetstream_backup_dir=/mnt/cimstor-jetstream/backups"],
        "jetstream_backup_dir /mnt/cimstor-jetstream/backups is on the JetStream storage (/mnt/cimstor-jetstream)",
    ),
    "backup dir is the share": (
        BACKUP,
        ["-e", "jetstream_backup_dir=/mnt/cimstor-jetstream"],
        "is on the JetStream storage",
    ),
    "backup dir relative": (
        BACKUP,
        ["-e", "jetstream_backup_dir=backups"],
        "jetstream_backup_dir 'backups' must be an absolute path",
    ),
    "restore without a set": (
        RESTORE,
        [],
        "Restore needs the set to restore from: -e jetstream_backup_set=<directory holding manifest.json>",
    ),
    "restore from a set without manifest": (
        RESTORE,
        ["-e", "jetstream_backup_set={unfinished}"],
        "holds no manifest.json",
    ),
    "restore drill neither true nor false": (
        RESTORE,
        ["-e", "jetstream_backup_set={unfinished}", "-e", "jetstream_restore_drill=maybe"],
        "jetstream_restore_drill 'maybe' must be",
    ),
    "restore with the backup dir on the share": (
        RESTORE,
        ["-e", "jetstream_backup_set={unfinished}", "-e", "jetstream_backup_dir=/mnt/cimstor-jetstream/x"],
        "is on the JetStream storage",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_request_is_refused_before_anything_is_contacted(case: str, tmp_path: Path) -> None:
    playbook, args, expected = CASES[case]
    unfinished = tmp_path / ".20261201T030000Z.partial"
    unfinished.mkdir()
    (unfinished / "SNAP.snapshot").write_bytes(b"half")
    args = [arg.format(unfinished=unfinished) for arg in args]
    run = run_offline_playbook(playbook, make_inventory(tmp_path, {}), *args, tmp_path=tmp_path)
    output = " ".join(run.output.split())
    assert run.result.returncode != 0, output[-2000:]
    assert expected in output, output[-3000:]
    assert run.ssh_calls == [], "a refused request connected to a host"
    assert "start the set under a temporary name" not in output and "plan each stream" not in output
    assert_one_short_refusal(run.output)


def render_units(tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    """The role's service and timer templates with its defaults, as the schedule entry point
    renders them, into tmp_path (never /etc/systemd)."""
    role = REPO / "roles" / "jetstream_backup"
    (tmp_path / "units").mkdir(parents=True)
    playbook = tmp_path / "render.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Render the backup units",
                    "hosts": "localhost",
                    "connection": "local",
                    "gather_facts": False,
                    "vars_files": [str(role / "defaults" / "main.yml"), str(role / "vars" / "main.yml")],
                    "tasks": [
                        {
                            "name": "Render",
                            "ansible.builtin.template": {
                                "src": str(role / "templates" / "nats-jetstream-backup.{{ item }}.j2"),
                                "dest": str(tmp_path / "units" / "{{ _jetstream_backup_unit }}.{{ item }}"),
                                "mode": "0644",
                            },
                            "loop": ["service", "timer"],
                        }
                    ],
                }
            ]
        )
    )
    # Extra vars: vars_files outrank play vars.
    settings = [
        "-e",
        "nats_server_cluster_name=phx-cluster",
        "-e",
        f"jetstream_backup_schedule_checkout={REPO}",
        "-e",
        f"jetstream_backup_schedule_inventory={REPO / 'inventory' / 'phx'}",
        "-e",
        "jetstream_backup_schedule_vault_password_file=/root/phx.vault-password",
        "-e",
        "jetstream_backup_schedule_dir=/var/backups/nats-jetstream",
    ]
    run = run_offline([str(BIN / "ansible-playbook"), "-i", "localhost,", str(playbook), *settings, *extra], tmp_path)
    assert run.result.returncode == 0, run.output[-3000:]
    unit = tmp_path / "units" / "nats-jetstream-backup-phx-cluster"
    return unit.with_suffix(".service"), unit.with_suffix(".timer")


def test_the_scheduled_job_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        missing_in_ci_fails("cannot verify the backup units: needs systemd-analyze (Debian 12 has it)")
    service, timer = render_units(tmp_path)
    verified = subprocess.run(
        ["systemd-analyze", "verify", str(service), str(timer)], capture_output=True, text=True, timeout=60, check=False
    )
    assert verified.returncode == 0 and verified.stdout + verified.stderr == "", verified.stdout + verified.stderr
    unit = service.read_text()
    ansible_playbook = REPO / ".venv" / "bin" / "ansible-playbook"
    assert (
        f"ExecStart={ansible_playbook} -i {REPO}/inventory/phx -e @/etc/nats-jetstream-backup/phx-cluster.yml "
        "--vault-password-file "
        f"/etc/nats-jetstream-backup/phx-cluster.vault-password {REPO}/playbooks/backup-streams.yml\n"
    ) in unit
    for line in (
        "Type=oneshot",
        "User=nats-backup",
        "ReadWritePaths=/var/backups/nats-jetstream",
        f"BindReadOnlyPaths={REPO}\n",
        "ProtectSystem=strict",
        "NoNewPrivileges=true",
        "CapabilityBoundingSet=\n",
        "UMask=0077",
    ):
        assert line in unit, line
    schedule = timer.read_text()
    for line in (
        "OnCalendar=daily",
        "Persistent=true",
        "RandomizedDelaySec=1h",
        "Unit=nats-jetstream-backup-phx-cluster.service",
    ):
        assert line in schedule, line

    # A broken schedule is what verify is there for: it names the unit and the problem.
    service, timer = render_units(
        tmp_path / "broken", "-e", "jetstream_backup_schedule_ansible_playbook=/nonexistent/ansible-playbook"
    )
    verified = subprocess.run(
        ["systemd-analyze", "verify", str(service)], capture_output=True, text=True, timeout=60, check=False
    )
    assert verified.returncode != 0 and "/nonexistent/ansible-playbook is not executable" in verified.stderr
