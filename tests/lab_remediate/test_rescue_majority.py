"""playbooks/remediate/rescue-majority.yml on the lab.

nats-2 and nats-3 are destroyed for good while events are published: nats-1 is left without a meta
leader. Naming one lost member only is refused (the others would still hold a majority). Then,
with the replacements named anew in the inventory, the meta rescue on nats-1 restores service,
replace-node deploys nats-2-2 and nats-3-2, verify is green and the meta group is exactly the
members. Only events acknowledged in the last moments before the loss may be missing (the
survivor may not have received them yet); everything older, and everything acknowledged after
the rescue, is there, once.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import LAB_INVENTORY, lab_inventory_copy, nats_lab, run_playbook, verify_until_green, wait_healthy
from tests.lab_remediate.test_replace_node import meta_peers
from verify.inventory import Cluster, load_cluster
from verify.load import BackgroundPublisher

pytestmark = pytest.mark.lab

PLAYBOOK = "remediate/rescue-majority.yml"
LOST = ("nats-2", "nats-3")
NEW_NAMES = {host: f"{host}-2" for host in LOST}
RESCUE = ("-e", f"replace_node={','.join(LOST)}", "-e", "rescue_majority_confirm=phx-cluster")
# At the lab publisher's pace (about 50 a second) the last 2 s before the loss: the only events
# the survivor may legitimately not hold.
RECENT = 100


@pytest.fixture
def renamed_inventory(healthy_lab: Cluster) -> Iterator[Path]:
    """The lab inventory with both replacements named anew; the lab is rebuilt after."""
    copy = lab_inventory_copy("rescue-majority", {h: {"nats_server_name": n} for h, n in NEW_NAMES.items()})
    yield copy
    shutil.rmtree(copy, ignore_errors=True)
    for step in (("down",), ("up",)):
        done = nats_lab(*step)
        assert done.returncode == 0, done.stdout + done.stderr
    deployed = run_playbook("site.yml", LAB_INVENTORY, timeout=900)
    assert deployed.returncode == 0, deployed.stdout[-4000:]
    wait_healthy(healthy_lab)


def test_two_of_three_lost_for_good_are_rescued_from_the_survivor(
    healthy_lab: Cluster, renamed_inventory: Path, tmp_path: Path
) -> None:
    with BackgroundPublisher(healthy_lab, stream="LAB_PROBE_RESCUE", subject="labprobe.rescue") as publisher:
        time.sleep(4)
        for host in LOST:
            destroyed = nats_lab("fault", "destroy", host)
            assert destroyed.returncode == 0, destroyed.stdout + destroyed.stderr
        lost_at = time.monotonic()
        acked_before_the_loss = list(publisher.tally.acked)
        created = nats_lab("up")
        assert created.returncode == 0, created.stdout + created.stderr

        one = run_playbook(PLAYBOOK, renamed_inventory, "-e", "replace_node=nats-3", "-e", "rescue_majority_confirm=x")
        said = " ".join(one.stdout.split())
        assert one.returncode != 0 and "2 of 3 members are left, a majority" in said, said[-3000:]

        started = time.monotonic()
        rescued = run_playbook(PLAYBOOK, renamed_inventory, *RESCUE, timeout=900)
        runbook_seconds = time.monotonic() - started
        assert rescued.returncode == 0, rescued.stdout[-6000:]
        said = " ".join(rescued.stdout.split())
        assert "removed from the cluster for good: nothing (already removed)" in said, said[-3000:]
        acked_after_the_rescue = len(publisher.tally.acked)
        time.sleep(3)
    assert len(publisher.tally.acked) > acked_after_the_rescue, "no event acknowledged after the rescue"
    missing, duplicated = publisher.audit()
    assert duplicated == []
    beyond = sorted(set(missing) - set(acked_before_the_loss[-RECENT:]))
    assert beyond == [], f"lost beyond the last moments before the loss: {beyond[:5]}"

    cluster = load_cluster(renamed_inventory)
    code, _, output, _ = verify_until_green(tmp_path, within=60, inventory=renamed_inventory)
    mttr = time.monotonic() - lost_at
    assert code == 0, output[-3000:]
    members = {"nats-1", *NEW_NAMES.values()}
    assert meta_peers(cluster) == dict.fromkeys(("nats-1", *LOST), members)
    print(
        f"rescue-majority: runbook {runbook_seconds:.1f} s, destroyed to green verify {mttr:.1f} s; "
        f"events acked {len(publisher.tally.acked)}, failed after retries {len(publisher.tally.failed)}, "
        f"acked and lost {len(missing)} (of the {RECENT} acked last before the loss)"
    )
