"""Which addresses an image fetch may connect to (a seller controls the URL: server-side request
forgery).

``address_refusal(ip)`` says why an address is refused: every range of IANA's special-purpose
registries (loopback, private, link-local, CGNAT, documentation, benchmarking, protocol
assignments, ...), multicast, cloud metadata, anything not globally routable; IPv6 forms that embed
an IPv4 address are judged by the embedded one. ``AllowRule`` entries (host names, IPs or CIDRs, each optionally with a
port) exempt trusted destinations, e.g. an internal object store; the metadata endpoints stay
refused unless an IP/CIDR rule names them.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Cloud instance-metadata endpoints: refused even when a host name on the allow-list resolves to
# them; only an allow-list IP/CIDR entry that contains the address lets them through.
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog"})

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Every range of the IANA IPv4 and IPv6 Special-Purpose Address Registries (RFC 6890 and its
# updates), refused whatever its "globally reachable" flag: Python's ``is_global`` lets some through
# (192.0.0.8, the PCP and TURN anycast addresses, AS112, AMT, ...), and no catalog image lives at
# any of them. The IPv6 forms that embed an IPv4 address are judged by it, before this table.
SPECIAL_PURPOSE: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(net), name) for net, name in (
        ("0.0.0.0/8", "this network"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "CGNAT"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation (TEST-NET-1)"),
        ("192.31.196.0/24", "AS112-v4"),
        ("192.52.193.0/24", "AMT"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private"),
        ("192.175.48.0/24", "direct delegation AS112"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation (TEST-NET-2)"),
        ("203.0.113.0/24", "documentation (TEST-NET-3)"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("255.255.255.255/32", "limited broadcast"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "local-use IPv4/IPv6 translation"),
        ("100::/64", "discard-only"),
        ("100:0:0:1::/64", "dummy prefix"),
        ("2001::/23", "IETF protocol assignments"),
        ("2001:db8::/32", "documentation"),
        ("2620:4f:8000::/48", "direct delegation AS112"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "segment routing SIDs"),
        ("fc00::/7", "unique-local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    ))


def address_refusal(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be fetched from (None = a public unicast address).

    IPv6 forms that embed an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, 6to4, NAT64) are judged
    by the embedded address: ``::ffff:127.0.0.1`` is loopback.
    """
    if ip in METADATA_ADDRESSES:
        return "cloud metadata"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = address_refusal(embedded)
            return f"embeds {embedded} ({inner})" if inner else None
    for net, name in SPECIAL_PURPOSE:
        if ip.version == net.version and ip in net:
            return name
    return None if ip.is_global else "not globally routable"


def parse_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def norm_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


@dataclass(frozen=True)
class AllowRule:
    host: str | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int | None = None

    @classmethod
    def parse(cls, entry: str) -> AllowRule:
        """``host``, ``host:port``, ``IP``, ``IP:port``, ``[v6]:port`` or ``CIDR``."""
        text = entry.strip()
        if not text:
            raise ValueError("empty allow-list entry")
        try:
            return cls(network=ipaddress.ip_network(text.strip("[]"), strict=False))
        except ValueError:
            pass
        host, port = text, None
        if text.startswith("["):
            inner, _, rest = text[1:].partition("]")
            host, port = inner, (int(rest[1:]) if rest.startswith(":") else None)
        elif text.count(":") == 1:
            h, p = text.split(":")
            host, port = h, int(p)
        ip = parse_ip(host)
        if ip is not None:
            return cls(network=ipaddress.ip_network(ip), port=port)
        return cls(host=norm_host(host), port=port)

    def matches(self, host: str, ip: IPAddress, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return ip.version == self.network.version and ip in self.network
        # A trusted host name exempts its addresses, except the metadata endpoints.
        return self.host == host and ip not in METADATA_ADDRESSES


def system_resolver(host: str, port: int) -> list[str]:
    """All addresses of ``host`` (one DNS lookup). Raises ``socket.gaierror``."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[str] = []
    for *_, sockaddr in infos:
        if sockaddr[0] not in out:
            out.append(sockaddr[0])
    return out


Resolver = Callable[[str, int], Sequence[str]]
