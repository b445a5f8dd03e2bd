"""Listen addresses as operators write them."""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback", "split_address"]


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) as a host and a port number."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine: 127.0.0.0/8, ::1 or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
