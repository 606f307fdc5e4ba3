"""Declared streams and NATS sizes/durations as the deploy reads them: the same parsing code the
jetstream_streams module uses (plugins/module_utils/jetstream_stream_spec.py), loaded from the
checkout."""

from __future__ import annotations

from types import ModuleType

from verify.shared_code import module_util


def stream_spec() -> ModuleType:
    return module_util("jetstream_stream_spec")
