"""Whether another program has a port bound on this host: the I/O half of
local port assignment (registry.ports decides, this only looks)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

__all__ = ["free_port_check"]


def free_port_check(address: str) -> Callable[[int], bool] | None:
    """A check of ports for services at `address`, or None where `address` is
    not one of this host's (the registry cannot see its ports).

    Host names other than localhost are not resolved: a registration must not
    wait on DNS, so their ports are not checked.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        if address.lower() != "localhost":
            return None
        ip = ipaddress.ip_address("127.0.0.1")
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    if not _binds(family, str(ip), 0):
        return None

    # A service at this address may well listen on every address of the host
    # (0.0.0.0 or ::), so the port must be free on all of them.
    wildcard = "::" if ip.version == 6 else "0.0.0.0"

    def is_free(port: int) -> bool:
        return _binds(family, wildcard, port)

    return is_free


def _binds(family: socket.AddressFamily, host: str, port: int) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((host, port))
        except OSError:
            # In use, not an address of this host, or not ours to bind
            # (a port below 1024): not free, whichever.
            return False
    return True
