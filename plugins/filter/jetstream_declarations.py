"""The declared streams checked before any host is touched, as an Ansible filter.

`jetstream_stream_problems` runs the same reading of a declaration that the jetstream_streams
module applies (plugins/module_utils/jetstream_stream_spec.py), over all declared streams at once,
and checks them against the account's and the nodes' JetStream limits from the inventory, so a bad
declaration stops the deploy in its preflight instead of after the rolling restart.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

_SPEC_FILE = Path(__file__).resolve().parent.parent / "module_utils" / "jetstream_stream_spec.py"


@cache
def _spec() -> ModuleType:
    # Filter plugins do not see the module_utils search path, so the shared file is loaded by path.
    loader = importlib.util.spec_from_file_location("jetstream_stream_spec", _SPEC_FILE)
    if loader is None or loader.loader is None:
        raise ImportError(f"cannot load {_SPEC_FILE}")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


def jetstream_stream_problems(
    streams: Any, cluster_size: int, account_limits: Any = None, node_limits: list[Any] | None = None
) -> list[str]:
    """Every problem of the declared streams, each one line naming the stream and the variable.

    `account_limits` is nats_server_app_jetstream_limits, `node_limits` one mapping per node with its
    host and nats_server_jetstream_max_file_store / _max_memory_store; without them only the
    declarations themselves are checked."""
    problems: list[str] = _spec().declaration_problems(streams, int(cluster_size), account_limits, node_limits)
    return problems


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"jetstream_stream_problems": jetstream_stream_problems}
