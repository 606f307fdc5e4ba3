"""playbooks/remediate/replace-node.yml on the lab.

nats-3 is destroyed for good (host, disk and store) while events are published, and `nats-lab up`
makes a new, empty nats-3 (its old directory is put back on the share, as when only the machine is
lost: it is kept aside, never used or deleted). Under its old server name the runbook refuses; under the new name the
inventory gives it, the lost name leaves the meta group, the replacement joins, every R3 stream is
whole again, no acknowledged event is lost and verify is green. The old identity cannot come back:
site.yml from the old inventory is refused before anything restarts.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nats_lab.config import load_lab
from tests.helpers import (
    LAB_INVENTORY,
    REPO,
    assert_nothing_lost,
    lab_inventory_copy,
    nats_lab,
    run_playbook,
    service_identity,
    verify_until_green,
    wait_healthy,
)
from verify import monitor
from verify.inventory import Cluster, load_cluster
from verify.load import BackgroundPublisher

pytestmark = pytest.mark.lab

PLAYBOOK = "remediate/replace-node.yml"
TARGET = "nats-3"
NEW_NAME = "nats-3-2"
# The export's directory on the controller: each host's store is <share>/<host> there.
SHARE = load_lab(REPO).share_dir
CONFIRM = ("-e", f"replace_node={TARGET}", "-e", f"replace_node_confirm={TARGET}")


@pytest.fixture
def replaced_inventory(healthy_lab: Cluster) -> Iterator[Path]:
    """The lab inventory as the operator edits it for the replacement; the lab is rebuilt after,
    since the removed name never joins again (which is the point)."""
    copy = lab_inventory_copy("replace-node", {TARGET: {"nats_server_name": NEW_NAME}})
    yield copy
    shutil.rmtree(copy, ignore_errors=True)
    for step in (("down",), ("up",)):
        done = nats_lab(*step)
        assert done.returncode == 0, done.stdout + done.stderr
    deployed = run_playbook("site.yml", LAB_INVENTORY, timeout=900)
    assert deployed.returncode == 0, deployed.stdout[-4000:]
    wait_healthy(healthy_lab)


def meta_peers(cluster: Cluster) -> dict[str, set[str]]:
    """Each answering member's view of the meta group: its leader and the leader's peers."""
    views = {}
    for node in cluster.nodes:
        meta = monitor.get_json(node.monitor_url, "/jsz").get("meta_cluster") or {}
        views[node.host] = (
            {meta.get("leader") or "?"} | {r["name"] for r in meta.get("replicas") or []} | {node.server_name}
        )
    return views


def test_a_destroyed_member_is_replaced_under_a_new_name_with_nothing_lost(
    healthy_lab: Cluster, replaced_inventory: Path, tmp_path: Path
) -> None:
    unclear = run_playbook(PLAYBOOK, LAB_INVENTORY, "-e", "replace_node=nats-9")
    assert unclear.returncode != 0
    assert "replace_node must name the member to replace" in " ".join(unclear.stdout.split()), unclear.stdout[-3000:]

    with BackgroundPublisher(healthy_lab, stream="LAB_PROBE_REPLACE", subject="labprobe.replace") as publisher:
        time.sleep(3)
        destroyed = nats_lab("fault", "destroy", TARGET)
        assert destroyed.returncode == 0, destroyed.stdout + destroyed.stderr
        lost_at = time.monotonic()
        created = nats_lab("up")
        assert created.returncode == 0, created.stdout + created.stderr
        # As when the machine is lost but the share keeps its directory: the old server's store.
        old_store = SHARE / TARGET
        (old_store / "jetstream").mkdir(parents=True)
        (old_store / "jetstream" / "left-behind").write_text("the lost server's state\n")
        (old_store / ".jetstream-owner").write_text(f"{TARGET}\n")

        # The inventory as it was names the new host like the lost one: refused, nothing removed.
        same_name = run_playbook(PLAYBOOK, LAB_INVENTORY, *CONFIRM)
        said = " ".join(same_name.stdout.split())
        assert same_name.returncode != 0
        assert f"nats_server_name is '{TARGET}', the name of the member that is gone" in said, said[-3000:]
        assert "Nothing was changed" in said

        started = time.monotonic()
        replaced = run_playbook(PLAYBOOK, replaced_inventory, *CONFIRM, timeout=900)
        runbook_seconds = time.monotonic() - started
        assert replaced.returncode == 0, replaced.stdout[-6000:]
        assert f"removed from the cluster for good: {TARGET}." in " ".join(replaced.stdout.split())
        time.sleep(2)
    assert_nothing_lost(publisher)
    (kept,) = SHARE.glob(f"{TARGET}.replaced-{TARGET}-*")
    assert (kept / "jetstream" / "left-behind").read_text() == "the lost server's state\n"

    cluster = load_cluster(replaced_inventory)
    code, _, output, _ = verify_until_green(tmp_path, within=60, inventory=replaced_inventory)
    mttr = time.monotonic() - lost_at
    assert code == 0, output[-3000:]
    members = {"nats-1", "nats-2", NEW_NAME}
    assert meta_peers(cluster) == dict.fromkeys(("nats-1", "nats-2", TARGET), members)
    print(
        f"replace-node: runbook {runbook_seconds:.1f} s, destroyed to green verify {mttr:.1f} s; "
        f"events acked {len(publisher.tally.acked)}, lost 0"
    )

    # The old identity cannot start again: site.yml from the old inventory stops at the store
    # (it belongs to the new server) before anything is restarted.
    running = service_identity(TARGET)
    stale = run_playbook("site.yml", LAB_INVENTORY)
    assert stale.returncode != 0
    assert f"belongs to server '{NEW_NAME}', not {TARGET}" in " ".join(stale.stdout.split()), stale.stdout[-3000:]
    assert service_identity(TARGET) == running
    assert meta_peers(cluster)[TARGET] == members
