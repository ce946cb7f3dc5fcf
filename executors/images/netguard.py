"""Fetching images over http(s) without becoming a proxy into the server's own network.

By default a URL whose host resolves to a loopback, private, link-local, multicast or
reserved address is refused (server-side request forgery); every redirect is followed by
hand, at most ``max_redirects`` times, and checked the same way. Downloads are capped in
size and time. The host that is resolved and checked is exactly the one http.client connects to
(a URL whose user info or percent-encoding makes the two differ is refused), and the connection
goes to the address that was checked, so a second DNS answer (DNS rebinding) cannot point it
elsewhere. An IPv6 address that embeds an IPv4 one (IPv4-mapped, NAT64, 6to4, IPv4-compatible)
is judged by the IPv4 address it embeds.
"""

import http.client
import ipaddress
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import List, Tuple


class FetchError(ValueError):
    """A URL that was refused or could not be fetched; the message names it and says why."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # redirects are followed (and checked) by fetch_url itself


_OPENER = urllib.request.build_opener(_NoRedirect)
_resolve = socket.getaddrinfo  # what check_url resolves hosts with (a seam for tests)


# IPv6 ranges whose last 32 bits are an IPv4 address the packets end up at (NAT64's well-known prefix,
# the deprecated IPv4-compatible form); IPv4-mapped and 6to4 addresses are read by ipaddress itself.
_LOW_32_EMBEDS_IPV4 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::/96"))


def _embedded_ipv4(address):
    """The IPv4 address an IPv6 address stands for (::ffff:a.b.c.d, 64:ff9b::a.b.c.d, 2002:AABB:CCDD::,
    ::a.b.c.d), or None."""
    if address.version != 6:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if int(address) > 1 and any(address in network for network in _LOW_32_EMBEDS_IPV4):  # not :: or ::1
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _public(address) -> bool:
    """Whether the server may connect to this address without ``allow_private``: an address that embeds
    an IPv4 address is judged by that one."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        return _public(embedded)
    return address.is_global and not address.is_multicast


class _Pin:
    """Connections to ``host`` go to the address check_url vetted, not to a second DNS answer (DNS rebinding).
    A connection to another host (a proxy from the environment) is left alone."""

    def __init__(self, host: str, address: str):
        self.host, self.address = host, address  # host as http.client holds it (connect_target)

    def factory(self, cls):
        def make(host, **kwargs):
            connection = cls(host, **kwargs)
            if connection.host == self.host:
                create = connection._create_connection
                connection._create_connection = lambda addr, *a, **k: create((self.address, addr[1]), *a, **k)
            return connection

        return make


class _PinnedHTTP(urllib.request.HTTPHandler):
    def __init__(self, pin: _Pin):
        super().__init__()
        self.pin = pin

    def http_open(self, req):
        return self.do_open(self.pin.factory(http.client.HTTPConnection), req)


class _PinnedHTTPS(urllib.request.HTTPSHandler):
    def __init__(self, pin: _Pin):
        super().__init__()
        self.pin = pin

    def https_open(self, req):
        kwargs = {"context": self._context}
        if hasattr(self, "_check_hostname"):
            kwargs["check_hostname"] = self._check_hostname
        return self.do_open(self.pin.factory(http.client.HTTPSConnection), req, **kwargs)


def _opener(url: str, addresses: List[str]):
    if not addresses:
        return _OPENER
    pin = _Pin(connect_target(url)[0], addresses[0])
    return urllib.request.build_opener(_NoRedirect, _PinnedHTTP(pin), _PinnedHTTPS(pin))


class _HTTPSPort(http.client.HTTPConnection):
    default_port = http.client.HTTPS_PORT  # only parses a host string; never connects


def connect_target(url: str) -> Tuple[str, int]:
    """(host, port) that urllib's http.client connects to for ``url`` without a proxy: urllib's parse
    (which unquotes the host and keeps any user info in it) followed by http.client's. FetchError if
    http.client cannot parse it."""
    try:
        netloc = urllib.request.Request(url).host
        probe = (_HTTPSPort if url[:6].lower() == "https:" else http.client.HTTPConnection)(netloc)
    except (ValueError, http.client.InvalidURL) as e:
        raise FetchError(f"{url}: invalid URL ({e})") from None
    return probe.host, probe.port


def check_url(url: str, *, allow_private: bool = False) -> List[str]:
    """Raise FetchError unless ``url`` is http(s) and (unless ``allow_private``) resolves to public addresses only.

    Returns the vetted addresses (none with ``allow_private``): fetch_url connects to the first of them."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme.lower() not in ("http", "https"):
        raise FetchError(f"{url}: only http and https URLs are fetched, not {parsed.scheme or 'no scheme'!r}")
    if not parsed.hostname:
        raise FetchError(f"{url}: no host in URL")
    host, port = connect_target(url)
    if host.lower() != parsed.hostname.lower():
        # user info (user@host) or a percent-encoded host: the host it names is not the host it connects to
        raise FetchError(f"{url}: refused: the URL names the host {parsed.hostname!r} but would connect to {host!r} "
                         f"(URLs with user info or a percent-encoded host are not fetched)")
    if allow_private:
        return []
    try:
        infos = _resolve(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise FetchError(f"{url}: cannot resolve host {host!r} ({e.strerror})") from None
    vetted = []
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        vetted.append(str(address))
        if not _public(address):
            embedded = _embedded_ipv4(address)
            shown = f"{address} (IPv4 {embedded})" if embedded is not None else f"{address}"
            raise FetchError(f"{url}: refused: {host} resolves to the non-public address {shown} "
                             f"(clipseek serve --allow-private-urls, the encoder's allow_private_urls=True, "
                             f"lets the server fetch from its own network)")
    return vetted


def fetch_url(url: str, *, timeout: float = 10.0, max_bytes: int = 50 * 2**20, allow_private: bool = False,
              max_redirects: int = 3, accept_types=("image/", "application/octet-stream")) -> bytes:
    """The body of ``url``, checked at every hop, at most ``max_bytes`` long."""
    current = url
    deadline = time.monotonic() + timeout
    for hop in range(max_redirects + 1):
        try:
            addresses = check_url(current, allow_private=allow_private)
        except FetchError as e:
            if hop == 0:
                raise
            raise FetchError(f"{url}: redirected to {e}") from None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError(f"{url}: timed out after {timeout:g} s")
        request = urllib.request.Request(current, headers={"User-Agent": "clipseek/0.1"})
        try:
            with _opener(current, addresses).open(request, timeout=remaining) as response:
                content_type = response.headers.get("Content-Type", "")
                if content_type and not content_type.startswith(tuple(accept_types)):
                    raise FetchError(f"{url}: server answered {content_type!r}, not an image")
                length = response.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > max_bytes:
                    raise FetchError(f"{url}: download of {int(length)} bytes is over the {max_bytes}-byte cap")
                return _read_capped(response, max_bytes, url, deadline, timeout)
        except urllib.error.HTTPError as e:
            if e.code in (301, 302, 303, 307, 308):
                location = e.headers.get("Location")
                e.close()
                if not location:
                    raise FetchError(f"{url}: HTTP {e.code} redirect without a Location") from None
                current = urllib.parse.urljoin(current, location)
                continue
            raise FetchError(f"{url}: HTTP {e.code} {e.reason}") from None
        except FetchError:
            raise
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise FetchError(f"{url}: timed out after {timeout:g} s") from None
            raise FetchError(f"{url}: cannot fetch ({reason})") from None
        except (TimeoutError, socket.timeout):
            raise FetchError(f"{url}: timed out after {timeout:g} s") from None
        except OSError as e:
            raise FetchError(f"{url}: cannot fetch ({e})") from None
    raise FetchError(f"{url}: more than {max_redirects} redirects")


def _read_capped(response, max_bytes: int, url: str, deadline: float, timeout: float) -> bytes:
    """The body, refused past ``max_bytes`` or when the whole download outlasts ``timeout``."""
    chunks, total = [], 0
    read = getattr(response, "read1", response.read)
    while True:
        if time.monotonic() > deadline:
            raise FetchError(f"{url}: timed out after {timeout:g} s")
        # read1: at most one socket read, so a server that drips bytes cannot hold us past the deadline
        chunk = read(min(1 << 16, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise FetchError(f"{url}: download over the {max_bytes}-byte cap")
