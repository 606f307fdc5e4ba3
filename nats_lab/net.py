"""The lab bridge and the nftables partition table.

Network safety: the bridge gets an address in the lab subnet only, no gateway, no NAT, and
ip_forward is never touched, so nothing from the hosts can leave the lab.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from nats_lab.config import Host, Lab
from nats_lab.util import run

NFT_TABLE = "cimlab"
NFT_FAMILY = "bridge"


def bridge_exists(lab: Lab) -> bool:
    return Path(f"/sys/class/net/{lab.bridge}").exists()


def bridge_state(lab: Lab) -> dict[str, object]:
    """{'exists', 'up', 'address'} of the bridge."""
    if not bridge_exists(lab):
        return {"exists": False, "up": False, "address": None}
    info = json.loads(run(["ip", "-j", "addr", "show", "dev", lab.bridge]).stdout)[0]
    addrs = [f"{a['local']}/{a['prefixlen']}" for a in info.get("addr_info", []) if a["family"] == "inet"]
    return {
        "exists": True,
        "up": "UP" in info.get("flags", []),
        "address": addrs[0] if addrs else None,
    }


def ensure_bridge(lab: Lab) -> None:
    if not bridge_exists(lab):
        run(["ip", "link", "add", lab.bridge, "type", "bridge"])
    # The lab is IPv4 only: no IPv6 link-local chatter on the bridge.
    disable_v6 = Path(f"/proc/sys/net/ipv6/conf/{lab.bridge}/disable_ipv6")
    if disable_v6.exists():
        disable_v6.write_text("1\n")
    wanted = f"{lab.bridge_address}/{lab.prefix}"
    if bridge_state(lab)["address"] != wanted:
        run(["ip", "addr", "flush", "dev", lab.bridge])
        run(["ip", "addr", "add", wanted, "dev", lab.bridge])
    run(["ip", "link", "set", lab.bridge, "up"])


def delete_bridge(lab: Lab) -> None:
    if bridge_exists(lab):
        run(["ip", "link", "delete", lab.bridge])


def nft_ruleset(hosts: Iterable[Host], cut_ports: Iterable[tuple[Host, int]] = ()) -> str:
    """The partition table: drop everything to/from the isolated hosts' veths, and TCP to or
    from a cut port of a host (both ends: it dials and it listens).

    forward covers host <-> host traffic over the bridge; input/output cover the machine's
    own traffic to the host (ssh, ping), so an isolated host is cut off from everyone. A cut
    port is dropped between hosts only: that is where routes run.
    """
    veths = sorted({h.veth for h in hosts})
    cuts = sorted({(h.veth, port) for h, port in cut_ports})
    if not veths and not cuts:
        return f"table {NFT_FAMILY} {NFT_TABLE}\ndelete table {NFT_FAMILY} {NFT_TABLE}\n"
    isolated_set, forward, host_chains = "", "", ""
    if veths:
        names = ", ".join(f'"{v}"' for v in veths)
        isolated_set = f"""
    set isolated {{
        type ifname
        elements = {{ {names} }}
    }}"""
        forward = """
        iifname @isolated drop
        oifname @isolated drop"""
        host_chains = """
    chain isolate_input {
        type filter hook input priority 0; policy accept;
        iifname @isolated drop
    }
    chain isolate_output {
        type filter hook output priority 0; policy accept;
        oifname @isolated drop
    }"""
    for veth, port in cuts:
        forward += "".join(
            f'\n        {way}ifname "{veth}" tcp {end} {port} drop' for way in ("i", "o") for end in ("dport", "sport")
        )
    return f"""\
table {NFT_FAMILY} {NFT_TABLE}
delete table {NFT_FAMILY} {NFT_TABLE}
table {NFT_FAMILY} {NFT_TABLE} {{{isolated_set}
    chain isolate_forward {{
        type filter hook forward priority 0; policy accept;{forward}
    }}{host_chains}
}}
"""


def apply_isolation(hosts: Iterable[Host], cut_ports: Iterable[tuple[Host, int]] = ()) -> None:
    """Make the table match HOSTS and CUT_PORTS in one transaction (no table at all when empty)."""
    run(["nft", "-f", "-"], input_text=nft_ruleset(hosts, cut_ports))


def nft_table_exists() -> bool:
    proc = run(["nft", "list", "table", NFT_FAMILY, NFT_TABLE], check=False)
    return proc.returncode == 0
