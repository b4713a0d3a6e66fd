"""The one guard against server-side request forgery: every URL the bridge itself fetches or
posts to (webhooks, inputs by URL) passes `check_url` first.

With an allow list (`WEBHOOK_ALLOWED_HOSTS`, `INPUT_URL_ALLOWED_HOSTS`: fnmatch patterns on the
host, or on `host:port` when the pattern names a port) only those hosts are reached, internal
ones included: that is how an operator allows a receiver on the private network. Without one,
every address the host resolves to must be public: loopback, private, link-local, unique-local,
multicast, reserved, unspecified and cloud metadata addresses are refused, for names after DNS
resolution and for IP literals in any notation (`2130706433`, `0x7f.1`, `::ffff:127.0.0.1`).

Redirects: `check_redirect` re-checks a `Location` before it is followed. Webhook deliveries
never follow redirects at all (a 3xx is a failed attempt).

DNS rebinding (a name that resolves to a public address for the check, then to an internal one
for the connection): a tornado client given `PublicResolver` connects only to addresses that
pass the same test at connection time.
"""
from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import re
import socket
from urllib.parse import urljoin, urlsplit

from tornado.netutil import Resolver

from balancer.errors import Refused

RESOLVE_TIMEOUT = 5.0
_WITH_PORT = re.compile(r"^(\[[^\]]*\]|[^:\[\]]*):([^:]+)$")
DEFAULT_PORTS = {"http": 80, "https": 443}
# Not covered by "not global" on every Python version: the metadata services themselves.
METADATA = (ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"))
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix: the last 32 bits are an IPv4 host


def parse_patterns(raw: str) -> tuple[str, ...]:
    """`WEBHOOK_ALLOWED_HOSTS`-style settings: comma-separated patterns, lower case."""
    return tuple(part.strip().lower() for part in raw.split(",") if part.strip())


def internal_reason(address: str) -> str | None:
    """Why this IP address must not be reached (None: it is public)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv4 address inside IPv6 reaches the IPv4 host: judge that one.
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None) \
            or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else None)
        if embedded is not None:
            reason = internal_reason(str(embedded))
            if reason:
                return reason
    if ip in METADATA:
        return "a cloud metadata address"
    for test, reason in (("is_loopback", "a loopback address"), ("is_unspecified", "an unspecified address"),
                         ("is_link_local", "a link-local address"), ("is_multicast", "a multicast address"),
                         ("is_private", "a private address"), ("is_reserved", "a reserved address")):
        if getattr(ip, test):
            return reason
    if not ip.is_global:  # shared (100.64/10), documentation and other special-purpose ranges
        return "not a public address"
    return None


def host_allowed(host: str, port: int, patterns: tuple[str, ...]) -> bool:
    """A pattern with a port (`h:8443`, `h:*`, `[::1]:*`) must match host and port, any other
    the host alone (an IPv6 host may be written with or without brackets)."""
    for pattern in patterns:
        with_port = _WITH_PORT.match(pattern.lower())
        host_pattern, port_pattern = with_port.groups() if with_port else (pattern.lower(), "*")
        if fnmatch.fnmatchcase(host, host_pattern.strip("[]")) and fnmatch.fnmatchcase(str(port), port_pattern):
            return True
    return False


async def resolve(host: str, port: int, timeout: float | None = None) -> list[str]:
    """Every address `host` resolves to, resolved off the loop (the default executor) with a
    timeout; an IP literal in any notation the system resolver accepts comes back normalised."""
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(
        loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), timeout or RESOLVE_TIMEOUT)
    return sorted({info[4][0] for info in infos})


async def check_url(url: str, field: str, allowed_hosts: tuple[str, ...]) -> None:
    """Refuse (a 400 naming `field`) a URL the bridge must not reach."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise Refused(f"{field}: '{url}' is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise Refused(f"{field}: only http:// and https:// URLs are accepted")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise Refused(f"{field}: the URL names no host")
    port = port or DEFAULT_PORTS[scheme]
    if allowed_hosts:
        if not host_allowed(host, port, allowed_hosts):
            raise Refused(f"{field}: host '{host}' is not an allowed host")
        return
    try:
        literal = str(ipaddress.ip_address(host))
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            addresses = await resolve(host, port)
        except (OSError, UnicodeError, asyncio.TimeoutError):
            raise Refused(f"{field}: host '{host}' cannot be resolved") from None
        if not addresses:
            raise Refused(f"{field}: host '{host}' cannot be resolved")
    for address in addresses:
        reason = internal_reason(address)
        if reason:
            raise Refused(f"{field}: host '{host}' is refused ({address} is {reason})")


async def check_redirect(url: str, location: str, field: str, allowed_hosts: tuple[str, ...]) -> str:
    """The absolute target of a redirect from `url`, checked like the first URL."""
    target = urljoin(url, location)
    await check_url(target, field, allowed_hosts)
    return target


class PublicResolver(Resolver):
    """A tornado resolver (`SimpleAsyncHTTPClient(resolver=...)`) that returns only addresses
    `check_url` would accept: with no allow list, internal ones are never connected to."""

    def initialize(self, allowed_hosts: tuple[str, ...] = ()) -> None:  # type: ignore[override]
        self.allowed_hosts = allowed_hosts

    async def resolve(self, host: str, port: int, family: socket.AddressFamily = socket.AF_UNSPEC):
        infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
            host, port, family=family, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT)
        found = [(fam, address) for fam, _, _, _, address in infos]
        if not self.allowed_hosts:  # an allow list was checked on the URL: its hosts may be internal
            for _, address in found:
                reason = internal_reason(address[0])
                if reason:
                    raise OSError(f"host '{host}' is refused ({address[0]} is {reason})")
        return found
