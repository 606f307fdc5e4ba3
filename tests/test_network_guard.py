"""The test session's own walls hold: in-process sockets and offline playbooks reach only
loopback and the lab (tests/network_guard.py, tests/helpers.py run_playbook)."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.helpers import EMPTY_NETWORK, LAB_COPIES, LAB_INVENTORY, PHX_INVENTORY, lab_inventory_copy, reaches_hosts
from tests.network_guard import OutsideTestNetwork

# Production's first node, a public resolver, the lab's first host and a documentation address.
REFUSED = ["10.0.20.1", "8.8.8.8", "192.0.2.10", "2001:db8::1"]


@pytest.mark.parametrize("address", REFUSED)
def test_a_connection_past_loopback_and_the_lab_is_refused_before_a_packet_leaves(address: str) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock, pytest.raises(OutsideTestNetwork, match=re.escape(address)):
        sock.connect((address, 4222))


def test_asyncio_connections_are_guarded_too() -> None:
    async def dial() -> None:
        await asyncio.open_connection("10.0.20.2", 4222)

    with pytest.raises(OutsideTestNetwork, match=r"10\.0\.20\.2"):
        asyncio.run(asyncio.wait_for(dial(), 5))


def test_loopback_and_the_lab_subnet_are_allowed() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=2):
            pass
    # The lab subnet passes the guard (the kernel may still refuse: the lab can be down).
    with socket.socket() as sock:
        sock.settimeout(0.2)
        try:
            sock.connect(("10.231.20.254", 9))
        except OutsideTestNetwork:
            pytest.fail("the lab subnet was refused by the guard")
        except OSError:
            pass


def test_only_the_lab_inventory_runs_playbooks_with_a_network(tmp_path: Path) -> None:
    assert not reaches_hosts(PHX_INVENTORY)
    assert not reaches_hosts(tmp_path)
    assert reaches_hosts("localhost,")
    # The empty network really has no route out: the kernel refuses before any packet is sent.
    probe = "import socket; socket.create_connection(('10.0.20.1', 4222), timeout=2)"
    done = subprocess.run(
        [*EMPTY_NETWORK, "python3", "-c", probe], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode != 0
    assert "Network is unreachable" in done.stderr, done.stderr


def test_a_lab_copy_reaches_hosts_only_while_it_keeps_the_labs_hosts() -> None:
    copy = lab_inventory_copy("guard-test", {"nats-3": {"nats_server_name": "nats-3-2"}})
    try:
        assert reaches_hosts(copy)
        # A host variable that could carry an address, or a changed hosts file, loses the network.
        (copy / "host_vars" / "nats-1.yml").write_text("---\nansible_host: 10.0.20.1\n")
        assert not reaches_hosts(copy)
        (copy / "host_vars" / "nats-1.yml").unlink()
        assert reaches_hosts(copy)
        hosts = copy / "hosts.yml"
        hosts.write_text(hosts.read_text().replace("10.231.20.13", "10.0.20.3"))
        assert not reaches_hosts(copy)
        # The same files anywhere but the copies' place are any other inventory.
        elsewhere = LAB_COPIES / "not-a-lab-copy"
        shutil.rmtree(elsewhere, ignore_errors=True)
        shutil.copytree(LAB_INVENTORY, elsewhere)
        assert not reaches_hosts(elsewhere)
        shutil.rmtree(elsewhere)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    with pytest.raises(AssertionError, match="ansible_host"):
        lab_inventory_copy("guard-test", {"nats-1": {"ansible_host": "10.0.20.1"}})
