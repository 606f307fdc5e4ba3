"""Files of the backup sets on the controller, shared by the jetstream_snapshot and
jetstream_backup_sets modules. Plain Python, no NATS or Ansible imports."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Syncs the directory `path` itself to disk, so the entries just created, renamed or removed
    in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
