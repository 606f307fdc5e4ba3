"""Small shared helpers: running commands, progress output, pid checks, locking."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from nats_lab.config import LabError

_START = time.monotonic()


def say(message: str) -> None:
    """A progress line with the time since the command started."""
    print(f"[{time.monotonic() - _START:5.1f}s] {message}", flush=True)


def warn(message: str) -> None:
    print(f"nats-lab: warning: {message}", file=sys.stderr, flush=True)


def elapsed() -> float:
    return time.monotonic() - _START


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input_text: str | None = None,
    timeout: float | None = 120,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output; a failure becomes a LabError with stderr."""
    try:
        proc = subprocess.run(
            list(argv),
            input=input_text,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} not found: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)} timed out after {timeout}s") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {detail}")
    return proc


def require_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise LabError(f"missing tools: {', '.join(missing)} (see the Makefile's apt packages)")


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (systemd-nspawn, bridges, nftables)")


def pid_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def read_pid(path: Path, marker: str) -> int | None:
    """The pid in PATH if that process is alive and its command line contains MARKER.

    The marker check keeps a recycled pid from being taken for ours.
    """
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    if marker in " ".join(pid_cmdline(pid)):
        return pid
    return None


def wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait until the processes are gone; return those still alive at the timeout."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
        if alive:
            time.sleep(0.05)
    return alive


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@contextlib.contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    """Serialize commands that change the lab (two `up`s at once would fight)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
