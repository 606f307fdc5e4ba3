"""Deploy figures on the lab, printed (not asserted): python -m benchmarks.deploy

1. `nats-lab up` from the cached base image (lab down first)
2. cold deploy of site.yml on the fresh lab
3. no-op re-run of site.yml (and its changed count)
4. `make lab` end to end from the cached base (lab down first)
Goals (issue #2): up <= 10 s, cold <= 60 s, no-op <= 15 s with changed=0, make lab <= 120 s.
Leaves the lab up, as `make lab` does.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def timed(argv: list[str]) -> tuple[float, str]:
    start = time.monotonic()
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}")
    return elapsed, result.stdout


def changed_total(output: str) -> int:
    return sum(int(n) for n in re.findall(r"changed=(\d+)", output))


def main() -> None:
    lab = [str(BIN / "nats-lab")]
    site = [str(BIN / "ansible-playbook"), "-i", "inventory/lab", "playbooks/site.yml"]
    timed([*lab, "down"])
    up, _ = timed([*lab, "up"])
    cold, cold_out = timed(site)
    noop, noop_out = timed(site)
    timed([*lab, "down"])
    make_lab, _ = timed(["make", "lab"])
    rows = [
        ("nats-lab up (cached base)", up, 10.0, ""),
        ("cold deploy (site.yml, fresh lab)", cold, 60.0, f"changed={changed_total(cold_out)}"),
        ("no-op re-run (site.yml)", noop, 15.0, f"changed={changed_total(noop_out)}"),
        ("make lab (from cache)", make_lab, 120.0, ""),
    ]
    print(f"{'figure':40} {'seconds':>8} {'goal':>6}  note")
    for name, seconds, goal, note in rows:
        print(f"{name:40} {seconds:8.1f} {goal:6.0f}  {note}{'' if seconds <= goal else '  (over goal)'}")


if __name__ == "__main__":
    main()
