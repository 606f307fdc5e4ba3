"""Runs one lab host: joins the host's own cgroups, then runs systemd-nspawn in a loop.

    python -m nats_lab.launcher CGROUP -- systemd-nspawn ARGS...

Exit code 133 from systemd-nspawn means the container asked for a reboot (`systemctl reboot`
inside): boot it again. Anything else (poweroff, SIGKILL of its init, our SIGTERM) ends the
launcher. SIGTERM is passed on to nspawn, which shuts the container down in order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

REBOOT_EXIT = 133
# Both hierarchies matter here: systemd in the container uses the named v1 "systemd"
# hierarchy or the unified one; a shared cgroup makes the hosts' services collide.
CGROUP_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/systemd"))


def cgroup_dirs(name: str) -> list[Path]:
    return [root / name for root in CGROUP_ROOTS if (root / "cgroup.procs").exists()]


def join_cgroups(name: str) -> None:
    for directory in cgroup_dirs(name):
        directory.mkdir(exist_ok=True)
        (directory / "cgroup.procs").write_text(f"{os.getpid()}\n")


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m nats_lab.launcher CGROUP -- COMMAND...", file=sys.stderr)
        return 2
    join_cgroups(argv[0])
    command = argv[2:]
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def on_term(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signals = {signal.SIGTERM, signal.SIGINT}

    def unblock() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)

    while True:
        # Blocked while nspawn starts, so a SIGTERM then is not lost between check and start.
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        if stopping:
            return 0
        started = time.strftime("%H:%M:%S")
        print(f"launcher: {started} starting {' '.join(command)}", flush=True)
        # The launcher has no threads, so preexec_fn is safe here.
        child = subprocess.Popen(command, preexec_fn=unblock)  # noqa: PLW1509
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
        rc = child.wait()
        print(f"launcher: nspawn exited with {rc}", flush=True)
        if rc != REBOOT_EXIT:
            return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
