"""The runbook tests each start from a healthy deployed lab and leave it healed and healthy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import nats_lab, wait_healthy
from verify.inventory import Cluster


@pytest.fixture
def healthy_lab(deployed_lab: Cluster) -> Iterator[Cluster]:
    """The deployed lab, healthy before the test and healed after it."""
    wait_healthy(deployed_lab)
    yield deployed_lab
    nats_lab("heal")
    wait_healthy(deployed_lab)
