"""nats-verify -i INVENTORY [options]: the post-deploy checks, with an operator's summary.

The same suite as `pytest --pyargs verify.checks --inventory INVENTORY`; any pytest option not
listed here (-x, -v, --durations N ...) is passed to pytest as it is.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

import pytest

from verify.plugin import EXIT_MEANINGS, OPTIONS, exit_code

DISTRIBUTION = "cim-nats-infra"
# The pytest options people use with nats-verify, listed in --help and passed on unchanged.
PYTEST_OPTIONS = (
    (
        "-m",
        "EXPR",
        "only the checks of these groups: host, cluster, security, eventstore (e.g. -m 'cluster or security')",
    ),
    ("-k", "EXPR", "only the checks whose names match (e.g. -k nats-2, -k 'healthz or routes')"),
    ("--junitxml", "FILE", "write a JUnit XML report of every check to this file"),
)


def _parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {int(code):3}  {meaning}" for code, meaning in EXIT_MEANINGS.items())
    parser = argparse.ArgumentParser(
        prog="nats-verify",
        description=__doc__.split("\n")[0],
        epilog=f"exit codes:\n{codes}\n\ndocs/verify.md explains every check.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # A prefix of a pytest option (--dur) must reach pytest, not match one of ours.
        allow_abbrev=False,
    )
    parser.add_argument(
        "-i", "--inventory", required=True, help="Ansible inventory of the cluster (e.g. inventory/lab)"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {metadata.version(DISTRIBUTION)}")
    checks = parser.add_argument_group("checks (the nats_verify pytest plugin)", argument_default=argparse.SUPPRESS)
    for flag, keywords in OPTIONS:
        if flag != "--inventory":
            checks.add_argument(flag, **{k: v for k, v in keywords.items() if k != "default"})
    chosen = parser.add_argument_group("pytest (any other pytest option is passed on too)")
    for flag, metavar, text in PYTEST_OPTIONS:
        chosen.add_argument(flag, dest=flag.lstrip("-"), default=None, metavar=metavar, help=text)
    return parser


def pytest_arguments(argv: list[str] | None = None) -> list[str]:
    """The pytest command line for nats-verify's arguments."""
    known, rest = _parser().parse_known_args(argv)
    given = vars(known)
    forwarded: list[str] = []
    for flag, keywords in OPTIONS:
        value = given.get(flag.lstrip("-").replace("-", "_"))
        if flag == "--inventory" or value is None:
            continue
        for one in value if keywords.get("action") == "append" else [value]:
            forwarded += [flag, str(one)]
    for flag, _, _ in PYTEST_OPTIONS:
        if given.get(flag.lstrip("-")) is not None:
            forwarded += [flag, given[flag.lstrip("-")]]
    return [
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
        *forwarded,
        *rest,
    ]


def main(argv: list[str] | None = None) -> int:
    return exit_code(pytest.main(pytest_arguments(argv)))


if __name__ == "__main__":
    sys.exit(main())
