#!/usr/bin/python
"""Ansible module: the backup sets of one cluster in a directory on the controller - start a new
set under a temporary name, give it its name once complete, and keep only the newest N."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: jetstream_backup_sets
short_description: Start, publish and prune the timestamped backup sets of one cluster
description:
  - A backup set is a directory I(path)/<UTC stamp> (C(20261201T030000Z)) holding the files of one
    C(jetstream_snapshot) save and its C(manifest.json). Only a directory with that name, not a
    symbolic link, holding a readable manifest of the module's format is a set; nothing else in
    I(path) is ever removed or renamed.
  - I(state=started) creates I(path)/.<name>.partial for the save to write into; it fails when that
    directory or the set I(name) exists already (another run, or a clock that went back).
  - I(state=published) renames I(path)/.<name>.partial to I(path)/<name> (one rename in one
    directory, so a reader sees either no set or a complete one), once the partial directory holds
    a manifest; the directory entry is synced to disk.
  - I(state=pruned) keeps the newest I(keep) complete sets (by name, which is their UTC time) and
    removes the older ones. The set named I(protect) is always kept and counts towards I(keep).
    Incomplete sets (.<stamp>.partial, or a stamp without a manifest) are reported, never removed.
options:
  path:
    description: The cluster's backup directory (jetstream_backup_dir/<cluster>).
    type: path
    required: true
  state:
    description: What to do; see the description.
    type: str
    choices: [started, published, pruned]
    required: true
  name:
    description: started and published, the set's name, a UTC stamp like 20261201T030000Z.
    type: str
  keep:
    description: pruned, how many complete sets to keep (at least 1).
    type: int
  protect:
    description: pruned, the name of a set that is kept whatever its place (the one just written).
    type: str
notes:
  - Supports check mode, nothing is created, renamed or removed; pruned reports what it would remove.
author: cim-nats-infra
"""

EXAMPLES = r"""
- name: Backup | keep the newest 14 sets
  jetstream_backup_sets:
    path: /var/backups/nats-jetstream/phx-cluster
    state: pruned
    keep: 14
    protect: 20261201T030000Z
  delegate_to: localhost
"""

RETURN = r"""
set:
  description: started and published, the set's final directory.
  type: str
  returned: when state is started or published
partial:
  description: started and published, the temporary directory the set is written to.
  type: str
  returned: when state is started or published
kept:
  description: pruned, the complete sets kept, newest first.
  type: list
  elements: str
  returned: when state is pruned
removed:
  description: pruned, the sets removed (in check mode, that would be), newest first.
  type: list
  elements: str
  returned: when state is pruned
incomplete:
  description: pruned, directories left by a save that did not finish (never removed).
  type: list
  elements: str
  returned: when state is pruned
"""

import json
import re
import shutil
from pathlib import Path
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.jetstream_backup_files import fsync_dir

SET_NAME = re.compile(r"\d{8}T\d{6}Z")
PARTIAL_NAME = re.compile(r"\.(\d{8}T\d{6}Z)\.partial")
MANIFEST = "manifest.json"
FORMAT = 1


class SetError(Exception):
    pass


def partial_dir(path: Path, name: str) -> Path:
    return path / f".{name}.partial"


def is_manifest(directory: Path) -> bool:
    """A manifest of jetstream_snapshot's format in `directory` (a regular file, readable)."""
    manifest = directory / MANIFEST
    if manifest.is_symlink() or not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("streams"), list)


def check_name(name: str | None) -> str:
    if not name or not SET_NAME.fullmatch(name):
        raise SetError(f"name must be a UTC stamp like 20261201T030000Z, not {name!r}")
    return name


def start(path: Path, name: str, check_mode: bool) -> dict[str, Any]:
    final, partial = path / name, partial_dir(path, name)
    for taken in (final, partial):
        if taken.exists() or taken.is_symlink():
            raise SetError(f"{taken} exists already: another backup run has this name; nothing was written")
    if not check_mode:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial.mkdir(mode=0o700)
    return {"changed": True, "set": str(final), "partial": str(partial)}


def publish(path: Path, name: str, check_mode: bool) -> dict[str, Any]:
    final, partial = path / name, partial_dir(path, name)
    result = {"changed": True, "set": str(final), "partial": str(partial)}
    if check_mode:
        return result
    if final.exists() or final.is_symlink():
        raise SetError(f"{final} exists already; the new set stays in {partial}")
    if not partial.is_dir() or not is_manifest(partial):
        raise SetError(f"{partial} holds no {MANIFEST}: the save did not finish, so it is no backup set")
    partial.rename(final)
    fsync_dir(path)
    return result


def survey(path: Path) -> tuple[list[str], list[str]]:
    """(complete set names newest first, incomplete directories) in `path`."""
    complete: list[str] = []
    incomplete: list[str] = []
    if not path.is_dir():
        return [], []
    for entry in sorted(path.iterdir(), reverse=True):
        if entry.is_symlink() or not entry.is_dir():
            continue
        if SET_NAME.fullmatch(entry.name):
            (complete if is_manifest(entry) else incomplete).append(entry.name)
        elif PARTIAL_NAME.fullmatch(entry.name):
            incomplete.append(entry.name)
    return complete, incomplete


def prune(path: Path, keep: int | None, protect: str | None, check_mode: bool) -> dict[str, Any]:
    if keep is None or keep < 1:
        raise SetError(f"keep must be at least 1 (got {keep}): the newest set is always kept")
    complete, incomplete = survey(path)
    kept = complete[:keep]
    if protect and protect in complete and protect not in kept:
        kept = [*complete[: keep - 1], protect]
    removed = [name for name in complete if name not in kept]
    if not check_mode:
        for name in removed:
            shutil.rmtree(path / name)
        if removed:
            fsync_dir(path)
    return {
        "changed": bool(removed),
        "kept": sorted(kept, reverse=True),
        "removed": removed,
        "incomplete": [str(path / name) for name in incomplete],
    }


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "state": {"type": "str", "choices": ["started", "published", "pruned"], "required": True},
            "name": {"type": "str"},
            "keep": {"type": "int"},
            "protect": {"type": "str"},
        },
        required_if=[("state", "started", ["name"]), ("state", "published", ["name"]), ("state", "pruned", ["keep"])],
        supports_check_mode=True,
    )
    params, path = module.params, Path(module.params["path"])
    try:
        if params["state"] == "started":
            result = start(path, check_name(params["name"]), module.check_mode)
        elif params["state"] == "published":
            result = publish(path, check_name(params["name"]), module.check_mode)
        else:
            result = prune(path, params["keep"], params["protect"], module.check_mode)
    except (SetError, OSError) as error:
        module.fail_json(msg=str(error), path=str(path))
    module.exit_json(path=str(path), **result)


if __name__ == "__main__":
    main()
