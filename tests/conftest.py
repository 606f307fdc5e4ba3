"""Shared fixtures. Lab tests (marker `lab`) run against the real 3-host lab; with CI=true a lab
that cannot start fails the run instead of skipping it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import network_guard
from tests.helpers import LAB_INVENTORY, OFFLINE_PKI, issue_certificates, missing_in_ci_fails, nats_lab, run_playbook
from verify.inventory import Cluster, load_cluster

LAB_WAS_UP = pytest.StashKey[bool]()
LAB_USED = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    # Before any test module is imported: nothing in this process reaches past loopback and the lab.
    network_guard.install()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Whether the lab was up before this run: a run that brings it up takes it down again."""
    session.config.stash[LAB_WAS_UP] = nats_lab("status").returncode == 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Only a run whose lab tests used the lab: then whatever state it is in (even half up after
    # a failure) goes, unless it was up before. `down` is idempotent.
    if session.config.stash.get(LAB_USED, False) and not session.config.stash.get(LAB_WAS_UP, True):
        nats_lab("down")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The lab tool's own tests first: they end by taking the lab down and up again (fresh hosts),
    so the deploy and verify tests after them start from a fresh lab."""
    items.sort(key=lambda item: 0 if "lab_tool" in item.path.parts else 1)


@pytest.fixture(scope="session")
def offline_pki() -> Path:
    """A CA and certificates for nats-1..3 in build/test-pki, from the nats_pki role (contacts no
    host; kept between runs, reissued when close to expiry)."""
    issue_certificates(pki_dir=OFFLINE_PKI)
    return OFFLINE_PKI


@pytest.fixture(scope="session")
def lab_cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The lab, up (pytest_sessionfinish takes it down again if the run started it)."""
    request.config.stash[LAB_USED] = True
    started = nats_lab("up")
    if started.returncode != 0:
        missing_in_ci_fails(f"nats-lab up failed:\n{started.stdout}\n{started.stderr}")
    yield load_cluster(LAB_INVENTORY)


@pytest.fixture(scope="session")
def deploy_log(lab_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """site.yml applied to the lab (a cold deploy on fresh hosts, a converge otherwise), at -vvv:
    the log the secrets check reads."""
    result = run_playbook("site.yml", LAB_INVENTORY, "-vvv", timeout=900)
    log = tmp_path_factory.mktemp("deploy") / "site-vvv.log"
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, f"site.yml failed on the lab:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    return log


@pytest.fixture(scope="session")
def deployed_lab(lab_cluster: Cluster, deploy_log: Path) -> Cluster:
    """The lab with site.yml applied."""
    return lab_cluster
