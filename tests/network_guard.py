"""No test opens a connection to anything but loopback and the lab's own subnet.

Installed for the whole session (tests/conftest.py): every Python socket's connect goes through
`allowed`, so a test that would reach 10.0.20.x (production) or the internet fails at once with
the address in the message. Subprocesses are walled separately: playbooks on any inventory but
the lab's run in an empty network namespace (tests/helpers.py run_playbook).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from functools import cache
from typing import Any

import yaml

from tests.helpers import LAB_INVENTORY

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class OutsideTestNetwork(ConnectionRefusedError):
    """A test tried to connect outside loopback and the lab."""


@cache
def lab_network() -> ipaddress.IPv4Network:
    hosts = yaml.safe_load((LAB_INVENTORY / "hosts.yml").read_text())
    return ipaddress.IPv4Network(hosts["all"]["vars"]["lab_bridge_address"], strict=False)


def allowed(address: Address) -> bool:
    return address.is_loopback or (address.version == 4 and address in lab_network())


def _addresses(host: str) -> list[Address]:
    try:
        return [ipaddress.ip_address(host.split("%", maxsplit=1)[0])]
    except ValueError:
        # A name: check everything it resolves to (the connect would pick one of them).
        return [ipaddress.ip_address(info[4][0]) for info in socket.getaddrinfo(host, None)]


def check(family: int, target: Any) -> None:
    if family not in (socket.AF_INET, socket.AF_INET6):
        return
    host = str(target[0])
    refused = [a for a in _addresses(host) if not allowed(a)]
    if refused:
        raise OutsideTestNetwork(
            f"test network guard: connection to {host} ({', '.join(map(str, refused))}) refused: "
            f"tests may reach only loopback and the lab subnet {lab_network()}"
        )


def install() -> Callable[[], None]:
    """Guards socket.connect and connect_ex; returns the function that removes the guard."""
    original_connect, original_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self: socket.socket, address: Any) -> None:
        check(self.family, address)
        original_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(self.family, address)
        return original_connect_ex(self, address)

    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]

    def uninstall() -> None:
        socket.socket.connect = original_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = original_connect_ex  # type: ignore[method-assign]

    return uninstall
