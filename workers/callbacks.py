"""Callback delivery: Standard Webhooks signing and an SSRF-safe HTTP POST.

The address check runs twice: when the URL is submitted and again on the very address the socket
connects to, so a hostname that resolves somewhere else later (DNS rebinding) is still refused.
Only CALLBACK_ALLOWED_NETWORKS opens private ranges.

Two transports share the guard: `deliver` (requests, blocking; image fetching uses its session)
and `deliver_async` (aiohttp), which the callbacks worker's delivery loop runs hundreds at a time.
"""

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import requests
from aiohttp.abc import AbstractResolver
from django.conf import settings
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

ALLOWED_SCHEMES = ("http", "https")


class BlockedAddress(OSError):
    """The URL's host is, or resolves to, an address callbacks may not reach. An OSError, so that
    urllib3 reports it like any other failed connection."""


def is_allowed_address(address):
    """Public unicast addresses, and whatever CALLBACK_ALLOWED_NETWORKS names."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if any(ip in network for network in settings.CALLBACK_ALLOWED_NETWORKS):
        return True
    return ip.is_global and not ip.is_multicast


def resolve_allowed(host, port):
    """Resolve `host` and return one permitted (family, sockaddr); refuse if any answer is blocked."""
    answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # Every answer must be allowed: a mix lets an attacker win the race for the bad one.
    for _family, _type, _proto, _name, sockaddr in answers:
        if not is_allowed_address(sockaddr[0]):
            raise BlockedAddress(f"{host} resolves to a blocked address ({sockaddr[0]})")
    family, _type, _proto, _name, sockaddr = answers[0]
    return family, sockaddr


def check_url(url, name="the callback URL"):
    """Raise BlockedAddress (or ValueError for a malformed URL) unless the URL may be reached;
    `name` says which URL in the messages."""
    parts = urlsplit(url)
    if parts.scheme not in ALLOWED_SCHEMES:
        raise ValueError(f"{name} must be http or https")
    if not parts.hostname:
        raise ValueError(f"{name} has no host")
    if parts.username or parts.password:
        raise ValueError(f"{name} must not carry credentials")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        resolve_allowed(parts.hostname, port)
    except socket.gaierror as error:
        raise ValueError(f"{parts.hostname} does not resolve") from error


class _GuardedConnectionMixin:
    """Opens the socket only to an address that passed the check, resolved right here."""

    def _new_conn(self):
        family, sockaddr = resolve_allowed(self._dns_host, self.port)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            for option in self.socket_options or ():  # urllib3's own: TCP_NODELAY
                sock.setsockopt(*option)
            sock.settimeout(self.timeout if isinstance(self.timeout, int | float) else None)
            sock.connect(sockaddr)
        except OSError:
            sock.close()
            raise
        return sock


class GuardedHTTPConnection(_GuardedConnectionMixin, HTTPConnection):
    pass


class GuardedHTTPSConnection(_GuardedConnectionMixin, HTTPSConnection):
    pass


class GuardedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = GuardedHTTPConnection


class GuardedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": GuardedHTTPConnectionPool, "https": GuardedHTTPSConnectionPool}


def guarded_session():
    """A requests session that can only connect to allowed addresses and ignores proxy variables."""
    session = requests.Session()
    session.trust_env = False
    adapter = GuardedAdapter(max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


_kept = threading.local()


def kept_session():
    """This thread's guarded session, kept from one delivery to the next so that a receiver's
    connection is reused (keep-alive) instead of a new TCP, and for https TLS, handshake for every
    callback. The address check runs whenever a connection is opened; a kept one stays with the
    address that passed it. A connection the receiver has closed is noticed and replaced before
    it is used (urllib3 checks it on the way out of its pool)."""
    session = getattr(_kept, "session", None)
    if session is None:
        session = _kept.session = guarded_session()
    return session


def sign(key, msg_id, timestamp, body):
    """Standard Webhooks v1 signature of `{id}.{timestamp}.{body}` with the raw key bytes."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@dataclass
class DeliveryResult:
    status_code: int | None
    latency_ms: int
    error: str

    @property
    def delivered(self):
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def gone(self):
        """410: the receiver asks us to stop for this image."""
        return self.status_code == 410


def signed_headers(key, msg_id, body):
    """The Standard Webhooks headers of one attempt, timestamped now."""
    timestamp = int(time.time())
    return {
        "content-type": "application/json",
        "user-agent": "face-detect-webhooks/1",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, msg_id, timestamp, body),
    }


def deliver(session, url, key, msg_id, body):
    """POST one signed attempt; never raises for network trouble, it is reported in the result."""
    headers = signed_headers(key, msg_id, body)
    started = time.monotonic()
    try:
        response = session.post(url, data=body, headers=headers, timeout=settings.CALLBACK_TIMEOUT, allow_redirects=False)
        response.close()
        return DeliveryResult(response.status_code, _elapsed_ms(started), "")
    except requests.exceptions.ConnectionError as error:
        reason = error.args[0] if error.args else error
        blocked = find_blocked(error)
        message = f"blocked: {blocked}" if blocked else f"connection failed: {reason}"
        return DeliveryResult(None, _elapsed_ms(started), message[:1000])
    except requests.exceptions.Timeout:
        return DeliveryResult(None, _elapsed_ms(started), f"timed out after {settings.CALLBACK_TIMEOUT} s")
    except requests.exceptions.RequestException as error:
        return DeliveryResult(None, _elapsed_ms(started), f"{type(error).__name__}: {error}"[:1000])


def find_blocked(error):
    """Walk the exception chain for a BlockedAddress raised at connect time."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, BlockedAddress):
            return error
        for arg in getattr(error, "args", ()):
            if isinstance(arg, BaseException):
                found = find_blocked(arg)
                if found:
                    return found
        error = getattr(error, "reason", None) or error.__cause__ or error.__context__
    return None


def _elapsed_ms(started):
    return round((time.monotonic() - started) * 1000)


# --- The asynchronous transport (workers/delivery.py) -----------------------------------------

# Receivers' answers are read to keep the connection reusable, but no further than this.
MAX_ANSWER_BYTES = 64 * 1024


class GuardedResolver(AbstractResolver):
    """aiohttp's name resolution through resolve_allowed's rule: a name any of whose answers is
    blocked is refused. (aiohttp skips resolvers for IP literals: _guarded_socket covers those.)"""

    async def resolve(self, host, port=0, family=socket.AF_INET):
        loop = asyncio.get_running_loop()
        answers = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, family=family)
        for _family, _type, _proto, _name, sockaddr in answers:
            if not is_allowed_address(sockaddr[0]):
                raise BlockedAddress(f"{host} resolves to a blocked address ({sockaddr[0]})")
        return [
            {"hostname": host, "host": sockaddr[0], "port": sockaddr[1], "family": family_, "proto": proto,
             "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV}
            for family_, _type, proto, _name, sockaddr in answers
        ]

    async def close(self):
        pass


def _guarded_socket(addr_info):
    """aiohttp's socket factory: called with the very address about to be connected to."""
    family, type_, proto, _name, sockaddr = addr_info
    if not is_allowed_address(sockaddr[0]):
        raise BlockedAddress(f"connecting to a blocked address ({sockaddr[0]})")
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def async_session():
    """An aiohttp session for the delivery loop: guarded resolution and connects, proxy variables
    ignored (trust_env off), connections kept per receiver, no pool limit of its own (the loop
    caps attempts per endpoint), CALLBACK_TIMEOUT for a whole attempt and
    CALLBACK_CONNECT_TIMEOUT for its connection. Create it inside the running loop."""
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(), socket_factory=_guarded_socket, limit=0)
    timeout = aiohttp.ClientTimeout(total=settings.CALLBACK_TIMEOUT, sock_connect=settings.CALLBACK_CONNECT_TIMEOUT)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False, auto_decompress=False,
                                 skip_auto_headers=("User-Agent",))


async def deliver_async(session, url, key, msg_id, body):
    """POST one signed attempt without blocking the loop; network trouble is reported in the
    result, never raised. Redirects are not followed; the answer counts by its status alone."""
    headers = signed_headers(key, msg_id, body)
    started = time.monotonic()
    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
            read = 0
            while read <= MAX_ANSWER_BYTES and (chunk := await response.content.readany()):
                read += len(chunk)
            if not response.content.at_eof():
                response.close()  # a long answer: drop the connection rather than read it all
            return DeliveryResult(response.status, _elapsed_ms(started), "")
    except aiohttp.ConnectionTimeoutError:
        return DeliveryResult(None, _elapsed_ms(started),
                              f"timed out connecting after {settings.CALLBACK_CONNECT_TIMEOUT} s")
    except TimeoutError:
        return DeliveryResult(None, _elapsed_ms(started), f"timed out after {settings.CALLBACK_TIMEOUT} s")
    except (aiohttp.ClientError, OSError) as error:
        blocked = find_blocked(error)
        message = f"blocked: {blocked}" if blocked else f"connection failed: {type(error).__name__}: {error}"
        return DeliveryResult(None, _elapsed_ms(started), message[:1000])
