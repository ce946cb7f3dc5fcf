"""netguard: the host that is checked is the host connected to, and IPv6 forms of IPv4 addresses are
judged by the IPv4 address they embed. No network: name resolution and connections are stand-ins."""

import ipaddress
import socket

import pytest

from executors.images import netguard
from executors.images.netguard import FetchError, check_url, fetch_url

PUBLIC = "93.184.216.34"  # what the stand-in resolver answers for every name


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def connections(monkeypatch, no_proxy):
    """Every name resolves to PUBLIC through check_url's resolver; every connection attempt is recorded
    (host, port) and refused, so nothing leaves the machine."""
    attempts = []

    def resolve(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC, port))]

    def connect(address, *args, **kwargs):
        attempts.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(netguard, "_resolve", resolve)
    monkeypatch.setattr(socket, "create_connection", connect)
    return attempts


def test_a_plain_url_connects_to_the_checked_address(connections):
    with pytest.raises(FetchError, match="cannot fetch"):
        fetch_url("http://pictures.example:8080/cat.png", timeout=5)
    assert connections == [(PUBLIC, 8080)]


@pytest.mark.parametrize("url", ["http://user@pictures.example/cat.png",
                                 "http://user:secret@pictures.example/cat.png",
                                 "http://pictures%2Eexample/cat.png",
                                 "http://a%40internal.example@pictures.example/cat.png",
                                 "http://127.0.0.1%2f@pictures.example/cat.png"])
def test_a_host_that_differs_from_the_one_connected_to_is_refused(connections, url):
    """urllib unquotes the host and keeps user info in it; the parsed URL does neither. Whatever the
    difference, no connection goes to a name that was not resolved and checked."""
    with pytest.raises(FetchError) as e:
        fetch_url(url, timeout=5)
    assert connections == [], f"{url} connected to {connections} without a check of that host"
    assert str(e.value).startswith(f"{url}: "), str(e.value)
    assert ("refused" in str(e.value) and "would connect to" in str(e.value)) or "invalid URL" in str(e.value)


def test_a_redirect_to_such_a_url_is_refused_too(connections, monkeypatch):
    real = netguard._opener

    class Redirect:
        def open(self, request, timeout):
            import urllib.error
            raise urllib.error.HTTPError(request.full_url, 302, "Found",
                                         {"Location": "http://x@pictures.example/cat.png"}, None)

    monkeypatch.setattr(netguard, "_opener", lambda url, addresses: Redirect() if "first" in url else real(url, addresses))
    with pytest.raises(FetchError, match=r"redirected to http://x@pictures.example/cat.png: refused"):
        fetch_url("http://first.example/cat.png", timeout=5)
    assert connections == []


@pytest.mark.parametrize("address,embedded", [
    ("64:ff9b::7f00:1", "127.0.0.1"),        # NAT64 well-known prefix
    ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
    ("64:ff9b::a00:1", "10.0.0.1"),
    ("::ffff:10.1.2.3", "10.1.2.3"),          # IPv4-mapped
    ("2002:c0a8:101::1", "192.168.1.1"),      # 6to4
    ("2002:7f00:1::", "127.0.0.1"),
    ("::7f00:1", "127.0.0.1"),                # IPv4-compatible
])
def test_ipv6_forms_of_private_ipv4_addresses_are_refused(monkeypatch, address, embedded):
    monkeypatch.setattr(netguard, "_resolve", lambda host, port, *a, **k: [(socket.AF_INET6, socket.SOCK_STREAM, 6, "",
                                                                          (address, port, 0, 0))])
    with pytest.raises(FetchError) as e:
        check_url("http://pictures.example/cat.png")
    assert f"non-public address {ipaddress.ip_address(address)} (IPv4 {embedded})" in str(e.value)
    assert netguard._embedded_ipv4(ipaddress.ip_address(address)) == ipaddress.ip_address(embedded)


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "::ffff:8.8.8.8", "2002:808:808::1", "2606:4700::1111"])
def test_ipv6_forms_of_public_addresses_are_allowed(monkeypatch, address):
    monkeypatch.setattr(netguard, "_resolve", lambda host, port, *a, **k: [(socket.AF_INET6, socket.SOCK_STREAM, 6, "",
                                                                          (address, port, 0, 0))])
    assert check_url("http://pictures.example/cat.png") == [str(ipaddress.ip_address(address))]


def test_the_refusal_names_the_serve_flag():
    with pytest.raises(FetchError) as e:
        check_url("http://10.1.2.3/a.png")
    assert "non-public address 10.1.2.3" in str(e.value) and "clipseek serve --allow-private-urls" in str(e.value)
