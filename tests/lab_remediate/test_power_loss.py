"""A site power cut on the lab: power lost to all three hosts at once while events are published
(the NFS stand-in drops every write not yet fsynced), then restored. With the deployed
sync_interval every acknowledged event is there afterwards, and verify is green again."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import assert_nothing_lost, nats_lab, verify_until_green, wait_healthy
from verify.inventory import Cluster
from verify.load import BackgroundPublisher

pytestmark = pytest.mark.lab


def test_every_acknowledged_event_survives_a_site_power_cut(healthy_lab: Cluster, tmp_path: Path) -> None:
    assert healthy_lab.nodes[0]["nats_server_jetstream_sync_interval"] == "always"
    with BackgroundPublisher(healthy_lab, stream="LAB_PROBE_POWER", subject="labprobe.power") as publisher:
        time.sleep(5)
        acked_before_the_cut = len(publisher.tally.acked)
        cut = nats_lab("fault", "power-loss", "all")
        assert cut.returncode == 0, cut.stdout + cut.stderr
        healed = nats_lab("heal")
        assert healed.returncode == 0, healed.stdout + healed.stderr
        power_back = time.monotonic()
        wait_healthy(healthy_lab, seconds=120)
        time.sleep(1)
    assert acked_before_the_cut > 50
    assert_nothing_lost(publisher)
    code, _, output, _ = verify_until_green(tmp_path, within=120)
    assert code == 0, output[-3000:]
    print(f"power back to green verify: {time.monotonic() - power_back:.1f} s")
