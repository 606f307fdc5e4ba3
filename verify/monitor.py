"""The NATS HTTP monitor endpoints (/healthz, /varz, /jsz, /routez ...), always with a timeout."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT = 3.0
# The CA each monitor URL is checked against (the monitor serves https with the node's
# certificate); registered by verify.inventory.load_cluster for the cluster it loads.
_TRUSTED: dict[str, Path] = {}


def trust(base_urls: Iterable[str], ca_file: Path | str) -> None:
    """Checks the monitors at `base_urls` against `ca_file` only (read when first used)."""
    for url in base_urls:
        _TRUSTED[url.rstrip("/")] = Path(ca_file)


def _context(base_url: str) -> ssl.SSLContext | None:
    ca_file = _TRUSTED.get(base_url.rstrip("/"))
    return ssl.create_default_context(cafile=str(ca_file)) if ca_file else None


@dataclass(frozen=True)
class Reply:
    status: int
    body: str

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class MonitorUnreachable(Exception):
    """The monitor port did not answer (refused, timed out, no route)."""


def get(base_url: str, path: str, timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """GETs base_url+path; HTTP errors are replies (a 503 /healthz is an answer), silence is not."""
    url = base_url.rstrip("/") + path
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=_context(base_url)) as response:
            return Reply(response.status, response.read().decode())
    except urllib.error.HTTPError as error:
        return Reply(error.code, error.read().decode(errors="replace"))
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise MonitorUnreachable(f"{url}: {reason}") from error


def get_json(base_url: str, path: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
    reply = get(base_url, path, timeout)
    if reply.status != 200:
        raise MonitorUnreachable(f"{base_url}{path}: HTTP {reply.status}: {reply.body[:200]}")
    return reply.json


def healthz(base_url: str, timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """Full health: JetStream on, meta leader known and current, every local replica current."""
    return get(base_url, "/healthz", timeout)
