"""Declared streams and NATS sizes/durations as the deploy reads them: the same parsing code the
jetstream_streams module uses (plugins/module_utils/jetstream_stream_spec.py), loaded from the
checkout."""

from __future__ import annotations

import importlib.util
from functools import cache
from types import ModuleType

from verify.inventory import REPO


@cache
def stream_spec() -> ModuleType:
    path = REPO / "plugins" / "module_utils" / "jetstream_stream_spec.py"
    spec = importlib.util.spec_from_file_location("jetstream_stream_spec", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
