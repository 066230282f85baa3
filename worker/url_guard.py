"""Refuses callback and image URLs that point inside the network (SSRF guard)."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlparse


class UnsafeURL(ValueError):
    pass


def _is_internal(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved
        or ip.is_multicast or ip.is_unspecified
    )


def check_url(url: str, allow_private: bool = False, allow_hosts: tuple[str, ...] = ()) -> None:
    """Raise UnsafeURL unless `url` is http(s) and every address its host resolves to is public."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UnsafeURL("must be an http(s) URL with a host")
    if allow_private or parsed.hostname in allow_hosts:
        return
    try:
        infos = socket.getaddrinfo(parsed.hostname, parsed.port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as error:
        raise UnsafeURL(f"host {parsed.hostname!r} does not resolve: {error}") from None
    for info in infos:
        if _is_internal(info[4][0]):
            raise UnsafeURL(
                f"host {parsed.hostname!r} resolves to the internal address {info[4][0]}; "
                "set DIFFQUEUE_ALLOW_PRIVATE_CALLBACKS=1 or DIFFQUEUE_URL_ALLOW_LIST to allow it"
            )
