"""The rules the backup runbooks check on the controller before they contact the cluster: where
the backup sets go (never the JetStream share itself) and how many are kept."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from typing import Any


def plain_path_problem(path: str) -> str | None:
    """Why `path` cannot be a backup directory as written, or None."""
    if not path.startswith("/"):
        return "must be an absolute path on the controller"
    if any(c.isspace() or ord(c) < 32 for c in path):
        return "must not contain spaces or control characters (the scheduled job's unit names it)"
    if path != posixpath.normpath(path) or path.startswith("//"):
        return f"must be written plainly (no '..', '.', '//' or trailing '/'): it means {posixpath.normpath(path)!r}"
    if path == "/":
        return "is the root directory"
    return None


def is_within(path: str, directory: str) -> bool:
    """`path` is `directory` or somewhere below it (both normalised)."""
    path, directory = posixpath.normpath(path), posixpath.normpath(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def parse_mounts(text: str) -> list[tuple[str, str, str]]:
    """(source, mount point, type) of each line of /proc/self/mounts."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            point = fields[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            mounts.append((fields[0], point, fields[2]))
    return mounts


def mount_of(path: str, mounts: list[tuple[str, str, str]]) -> tuple[str, str, str] | None:
    """The mount holding `path`: the longest mount point it is within."""
    holding = [m for m in mounts if is_within(path, m[1])]
    return max(holding, key=lambda m: len(m[1])) if holding else None


def same_export(source: str, share: str) -> bool:
    """`source` (a controller mount's) is the JetStream share or a directory of it."""
    share = share.rstrip("/")
    return bool(share) and (source.rstrip("/") == share or source.startswith(share + "/"))


def backup_dir_problems(settings: Mapping[str, Any], mounts_text: str = "") -> list[str]:
    """Everything wrong with the backup settings, one short clause each. `settings` holds
    jetstream_backup_dir, jetstream_backup_keep, jetstream_storage_mount_path and
    jetstream_storage_mount_source; `mounts_text` is the controller's /proc/self/mounts."""
    problems: list[str] = []
    keep = settings.get("jetstream_backup_keep")
    if isinstance(keep, str) and keep.strip().isdigit():
        keep = int(keep)  # -e key=value passes text
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        problems.append(
            f"jetstream_backup_keep {keep!r} must be a whole number of at least 1 (the newest sets kept, the one "
            "just written among them)"
        )
    backup_dir = settings.get("jetstream_backup_dir")
    if not isinstance(backup_dir, str) or not backup_dir:
        problems.append("jetstream_backup_dir must be set: an absolute directory on the controller")
        return problems
    problem = plain_path_problem(backup_dir)
    if problem:
        problems.append(f"jetstream_backup_dir {backup_dir!r} {problem}")
        return problems
    mount_path = str(settings.get("jetstream_storage_mount_path") or "")
    share = str(settings.get("jetstream_storage_mount_source") or "")
    real = os.path.realpath(backup_dir)
    for candidate in dict.fromkeys((backup_dir, real)):
        if mount_path and is_within(candidate, mount_path):
            shown = backup_dir if candidate == backup_dir else f"{backup_dir} (really {candidate})"
            problems.append(
                f"jetstream_backup_dir {shown} is on the JetStream storage ({mount_path}): a backup there dies "
                "with the share it backs up. Choose a directory on the controller's own disk"
            )
            return problems
    found = mount_of(real, parse_mounts(mounts_text))
    if found and same_export(found[0], share):
        problems.append(
            f"jetstream_backup_dir {backup_dir} is on {found[0]} (mounted at {found[1]} here), the JetStream "
            "share itself: a backup there dies with it. Choose a directory on the controller's own disk"
        )
    return problems


def size(count: Any) -> str:
    value = float(count or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


# What a restore did to each stream (jetstream_snapshot's action), in the report.
ACTIONS = {
    "restored": "was missing: restored",
    "replaced_empty": "was empty: replaced",
    "overwritten": "held other data: overwritten",
}


def stream_line(stream: Mapping[str, Any]) -> str:
    """One stream of a jetstream_snapshot result, for the run's report."""
    parts = [f"{stream.get('name')}: {stream.get('messages', 0)} messages"]
    if stream.get("messages"):
        parts[0] += f" (seq {stream.get('first_seq')}-{stream.get('last_seq')})"
    parts.append(f"{size(stream.get('bytes'))} stored")
    if stream.get("snapshot_bytes") is not None:
        parts.append(f"archive {size(stream.get('snapshot_bytes'))}")
    parts.append(f"{stream.get('consumers', 0)} consumers")
    if "restored_consumers" in stream:
        parts.append(f"{stream['restored_consumers']} consumers restored")
    if stream.get("action"):
        parts.append(ACTIONS.get(str(stream["action"]), str(stream["action"])))
    if stream.get("aged_out"):
        parts.append(f"{stream['aged_out']} aged out by the stream's own limits since the backup")
    if stream.get("seconds") is not None:
        parts.append(f"{float(stream['seconds']):.2f} s")
    return ", ".join(parts)


def names(value: Any) -> list[str]:
    """Stream names given as a list or as text: `A,B`, `[A, B]` (what `-e key=[A,B]` passes)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("[") and value.endswith("]"):
            value = value[1:-1]
        value = value.split(",")
    return list(dict.fromkeys(str(item).strip().strip("'\"") for item in value if str(item).strip()))


def skip_lines(reasons: Mapping[str, str] | None) -> list[str]:
    """A restore's skip_reasons, one line each."""
    return [f"{name}: left alone, {why}" for name, why in (reasons or {}).items()]


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Any]:
        return {
            "jetstream_backup_dir_problems": backup_dir_problems,
            "jetstream_backup_stream_line": stream_line,
            "jetstream_backup_names": names,
            "jetstream_backup_skip_lines": skip_lines,
        }
