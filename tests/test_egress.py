"""balancer/egress.py: the guard against server-side request forgery (no network: names that
need DNS are resolved through a stub)."""
from __future__ import annotations

import asyncio

import pytest

from balancer import egress
from balancer.errors import Refused


@pytest.fixture
def dns(monkeypatch):
    """name -> addresses the stub resolver returns (a missing name fails like NXDOMAIN)."""
    table: dict[str, list[str]] = {}

    async def fake_resolve(host, port, timeout=None):
        if host not in table:
            raise OSError("Name or service not known")
        return table[host]

    monkeypatch.setattr(egress, "resolve", fake_resolve)
    return table


async def refused(url, field="webhook", allowed=()):
    with pytest.raises(Refused) as info:
        await egress.check_url(url, field, allowed)
    assert str(info.value).startswith(f"{field}: "), str(info.value)
    return str(info.value)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://127.1/", "http://2130706433/", "http://0x7f000001/", "http://0177.0.0.1/",
    "http://[::1]:8080/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]/", "http://0.0.0.0/",
    "http://[::]/", "http://10.1.2.3/", "http://172.16.0.1/", "http://192.168.1.1/", "http://169.254.169.254/",
    "http://[fd00:ec2::254]/", "http://[fc00::1]/", "http://[fe80::1]/", "http://224.0.0.1/",
    "http://240.0.0.1/", "http://100.64.0.1/", "http://[2002:7f00:1::]/", "http://[64:ff9b::a00:1]/", "https://255.255.255.255/",
])
async def test_internal_literals_are_refused(url):
    # Literals in odd notations reach the system resolver, which normalises them.
    assert "is refused" in await refused(url)


async def test_names_are_judged_by_every_address_they_resolve_to(dns):
    dns["hooks.example.com"] = ["93.184.215.14"]
    dns["sneaky.example.com"] = ["93.184.215.14", "10.0.0.7"]
    dns["meta.example.com"] = ["169.254.169.254"]
    await egress.check_url("https://hooks.example.com/in", "webhook", ())
    assert "10.0.0.7 is a private address" in await refused("https://sneaky.example.com/")
    assert "cloud metadata" in await refused("http://meta.example.com/latest/meta-data/")
    assert "cannot be resolved" in await refused("http://nowhere.example.com/")


async def test_localhost_is_resolved_then_refused():
    assert "loopback" in await refused("http://localhost:9/", field="inputs")


async def test_public_literal_passes():
    await egress.check_url("http://93.184.215.14:8080/x", "webhook", ())
    await egress.check_url("https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/", "webhook", ())


@pytest.mark.parametrize("url, words", [
    ("ftp://93.184.215.14/", "only http:// and https://"),
    ("file:///etc/passwd", "only http:// and https://"),
    ("gopher://example.com/", "only http:// and https://"),
    ("http:///nohost", "names no host"),
    ("http://example.com:99999/", "not a valid URL"),
    ("not a url", "only http:// and https://"),
])
async def test_malformed_urls_are_refused(url, words):
    assert words in await refused(url)


async def test_allow_list_admits_only_its_hosts_internal_ones_included(dns):
    allowed = egress.parse_patterns(" *.example.com, 10.0.0.5 ,hooks.internal:8443, 127.0.0.1:* , [::1]:*")
    assert allowed == ("*.example.com", "10.0.0.5", "hooks.internal:8443", "127.0.0.1:*", "[::1]:*")
    for url in ("https://a.example.com/", "http://10.0.0.5:81/", "https://hooks.internal:8443/",
                "http://127.0.0.1:5555/hook", "http://[::1]:7/"):
        await egress.check_url(url, "webhook", allowed)
    for url in ("https://example.com.evil.net/", "http://10.0.0.6/", "https://hooks.internal/",
                "http://169.254.169.254/", "https://example.com/", "http://localhost:5555/"):
        assert "is not an allowed host" in await refused(url, allowed=allowed)


async def test_redirect_targets_are_checked_again(dns):
    dns["a.example.com"] = ["93.184.215.14"]
    target = await egress.check_redirect("https://a.example.com/x/y", "/z?q=1", "inputs", ())
    assert target == "https://a.example.com/z?q=1"
    with pytest.raises(Refused, match="inputs: host '127.0.0.1'"):
        await egress.check_redirect("https://a.example.com/x", "http://127.0.0.1/admin", "inputs", ())


async def test_resolution_has_a_timeout(monkeypatch):
    async def slow_getaddrinfo(*args, **kwargs):
        await asyncio.sleep(30)

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "getaddrinfo", slow_getaddrinfo)
    monkeypatch.setattr(egress, "RESOLVE_TIMEOUT", 0.05)
    with pytest.raises(Refused, match="cannot be resolved"):
        await egress.check_url("http://slow.example.com/", "webhook", ())


async def test_public_resolver_never_returns_an_internal_address():
    # What a client connects to is checked again at connection time: a name that resolved to a
    # public address for check_url and now resolves to an internal one (DNS rebinding) fails.
    with pytest.raises(OSError, match="localhost' is refused .*loopback"):
        await egress.PublicResolver().resolve("localhost", 80)
    with pytest.raises(OSError, match="is refused"):
        await egress.PublicResolver().resolve("169.254.169.254", 80)
    assert await egress.PublicResolver().resolve("93.184.215.14", 443) == [
        (__import__("socket").AF_INET, ("93.184.215.14", 443))]
    # With an allow list the hosts were matched on the URL; internal ones are then the operator's choice.
    assert await egress.PublicResolver(allowed_hosts=("127.0.0.1:*",)).resolve("127.0.0.1", 8080)
