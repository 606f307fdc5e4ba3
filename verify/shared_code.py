"""Code verify shares with the deploy's modules, loaded from the checkout's plugins/module_utils
(plugins/ is an Ansible collection, not a package verify can import)."""

from __future__ import annotations

import importlib.util
from functools import cache
from types import ModuleType

from verify.inventory import REPO


@cache
def module_util(name: str) -> ModuleType:
    """plugins/module_utils/<name>.py, loaded once."""
    path = REPO / "plugins" / "module_utils" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
