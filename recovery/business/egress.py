"""HTTP to a business's endpoint, and never anywhere else.

An endpoint's URL is the business's, typed by an operator, but the name in
it may resolve anywhere tomorrow. So every address is checked when the
connection is made, not when the URL was added: the name is resolved, every
address it gives must be public (not loopback, private, link-local, shared,
reserved or a cloud metadata service) unless an operator allowed its network
(OUTBOUND_ALLOWED_NETWORKS), and the connection goes to the address that was
checked, so a second lookup cannot swap it. Redirects are not followed, and
the answer's body is read to its first KiB.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from urllib.parse import urlsplit

TIMEOUT_SECONDS = 10.0
BODY_KEPT = 1024

Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address

# Cloud metadata services some providers put at addresses the flags below
# do not all cover (AWS's IPv6 one is in fc00::/7, Alibaba's is public space).
METADATA = (
    ipaddress.ip_network("169.254.169.254/32"),
    ipaddress.ip_network("fd00:ec2::254/128"),
    ipaddress.ip_network("100.100.100.200/32"),
)
SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, not the internet


class Refused(Exception):
    """The endpoint may not be reached; the message says why, and names no secret."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: str


def why_refused(address: Address, allowed: Sequence[Network]) -> str | None:
    """Why a connection to `address` is refused, or None if it may be made."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in METADATA):
        return "a cloud metadata address"
    if any(address in network for network in allowed):
        return None
    for flag, what in (
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_unspecified", "an unspecified address"),
        ("is_private", "a private address"),
        ("is_reserved", "a reserved address"),
    ):
        if getattr(address, flag):
            return what
    if address in SHARED:
        return "a shared (carrier-grade NAT) address"
    return None


def check_url(url: str, require_https: bool) -> str | None:
    """What is wrong with an endpoint URL as written, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http"):
        return "an endpoint URL starts with https:// (or http:// outside production)"
    if require_https and parts.scheme != "https":
        return "in production an endpoint URL must be https://"
    if not parts.hostname:
        return "the URL names no host"
    if parts.username or parts.password:
        return "put no credentials in the URL; deliveries are signed instead"
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return "the URL's port is not a number"
    return None


def resolve(host: str, port: int, allowed: Sequence[Network]) -> Address:
    """The address to connect to: every address the name has must be allowed,
    so a name that resolves both inside and outside is refused."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Refused(f"{host} does not resolve ({exc.strerror})") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    for address in addresses:
        why = why_refused(address, allowed)
        if why is not None:
            raise Refused(f"{host} resolves to {why} ({address}); refused")
    return addresses[0]


class _Pinned(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: Address, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((str(self.address), self.port), self.timeout)


class _PinnedTLS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: Address, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((str(self.address), self.port), self.timeout)
        # The certificate is checked against the name, not the address.
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    allowed: Sequence[Network],
    require_https: bool,
    timeout: float = TIMEOUT_SECONDS,
) -> Answer:
    """POST `body` to `url`; raises Refused for an address it must not reach,
    OSError (timeouts included) for one that did not answer."""
    problem = check_url(url, require_https)
    if problem is not None:
        raise Refused(problem)
    parts = urlsplit(url)
    host = parts.hostname or ""
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    address = resolve(host, port, allowed)
    kind = _PinnedTLS if tls else _Pinned
    connection = kind(host, port, address, timeout)
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        kept = response.read(BODY_KEPT)
        return Answer(response.status, kept.decode("utf-8", "replace"))
    except http.client.HTTPException as exc:
        raise OSError(f"bad HTTP answer: {type(exc).__name__}") from None
    finally:
        connection.close()
