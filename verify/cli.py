"""nats-verify -i INVENTORY [pytest options]: the post-deploy checks, with an operator's summary.

Same as `pytest --pyargs verify.checks --inventory INVENTORY`; e.g. `-m host`, `-m "cluster or
eventstore"`, `--junitxml FILE`, `--verify-json FILE`, `-k nats-2`.
"""

from __future__ import annotations

import argparse
import sys

import pytest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nats-verify", description=__doc__.split("\n")[0])
    parser.add_argument("-i", "--inventory", required=True, help="Ansible inventory of the cluster")
    known, pytest_args = parser.parse_known_args(argv)
    args = [
        "--pyargs",
        "verify.checks",
        "--inventory",
        known.inventory,
        "-p",
        "no:cacheprovider",
        # Neither is used by the checks; together they cost ~3 s of a ~10 s run: hypothesis'
        # summary imports it at exit, and assertion rewriting recompiles every check module
        # each run (the messages are written out in each assert).
        "-p",
        "no:hypothesispytest",
        "--assert=plain",
        # The checks need no conftest; a checkout's own test conftest must not run here.
        "--noconftest",
        "-q",
        "--tb=no",
        "-o",
        "addopts=",
        *pytest_args,
    ]
    return int(pytest.main(args))


if __name__ == "__main__":
    sys.exit(main())
