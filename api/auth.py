"""Bearer API-key authentication, the per-client rate limit, and the throttle on failed
authentication per client address (bad API keys here; admin logins through django-axes)."""

import functools
import logging
import threading
import time

import redis
from cachetools import TTLCache
from django.conf import settings
from rest_framework import authentication, exceptions, throttling

from .models import Client, hash_api_key

logger = logging.getLogger(__name__)


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer <api_key>`; the key is looked up by its hash, never stored plain."""

    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Malformed Authorization header.")
        try:
            api_key = header[1].decode("ascii")
        except UnicodeDecodeError:
            api_key = ""  # never a key: counted as a failure below like any other bad one
        address = client_address(request)
        if failures_over_limit(address):
            raise _failed_auth_throttled()
        client = active_client(hash_api_key(api_key))
        if client is None:
            if not note_failure(address):
                raise _failed_auth_throttled()
            raise exceptions.AuthenticationFailed("Invalid API key.")
        return client, None

    def authenticate_header(self, request):
        # Makes DRF answer 401 (with WWW-Authenticate), not 403.
        return self.keyword


_known_clients = None
_known_clients_lock = threading.Lock()


def active_client(key_hash):
    """The active client whose key has this hash, or None.

    Found clients are remembered in this process for AUTH_CACHE_SECONDS, which spares every
    request a query: a deactivated client's key keeps working at most that long. Unknown keys
    are never remembered, so a new client's key works at once.
    """
    global _known_clients
    ttl = settings.AUTH_CACHE_SECONDS
    if ttl <= 0:
        return Client.objects.filter(api_key_hash=key_hash, is_active=True).first()
    with _known_clients_lock:
        if _known_clients is None or _known_clients.ttl != ttl:
            _known_clients = TTLCache(maxsize=1024, ttl=ttl)
        client = _known_clients.get(key_hash)
    if client is None:
        client = Client.objects.filter(api_key_hash=key_hash, is_active=True).first()
        if client is not None:
            with _known_clients_lock:
                _known_clients[key_hash] = client
    return client


# Sliding-window counter, atomic in Redis: the previous window's count, weighted by how much of
# it still lies within the last `duration` seconds, plus this window's. A request is counted
# only if it is allowed, so a client over its rate still gets its rate's worth through.
SLIDING_WINDOW = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
if previous * tonumber(ARGV[2]) + current >= tonumber(ARGV[1]) then
    return 0
end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


@functools.cache
def rate_limit_redis():
    """This process's Redis client for rate limits (its connection pool survives a fork)."""
    return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=1)


@functools.cache
def _sliding_window():
    return rate_limit_redis().register_script(SLIDING_WINDOW)


class ClientRateThrottle(throttling.SimpleRateThrottle):
    """Requests per client, counted in Redis by one script call (one round trip, atomic, so
    concurrent API processes never lose counts). Fails open if Redis is down, since refusing
    every request would be worse than not limiting for a while."""

    scope = "client"

    def get_cache_key(self, request, view):
        if isinstance(request.user, Client):
            return f"throttle:client:{request.user.pk}"
        return None

    def allow_request(self, request, view):
        if self.rate is None:
            return True
        key = self.get_cache_key(request, view)
        if key is None:
            return True
        window, elapsed = divmod(time.time(), self.duration)
        window = int(window)
        try:
            allowed = _sliding_window()(
                keys=[f"{key}:{window}", f"{key}:{window - 1}"],
                args=[self.num_requests, 1 - elapsed / self.duration, 2 * self.duration],
            )
        except (redis.RedisError, OSError):
            logger.warning("rate-limit store unavailable; request allowed", exc_info=True)
            return True
        # When refused: this window's count alone may already be at the rate, so wait for the next.
        self.retry_after = self.duration - elapsed
        return bool(allowed)

    def wait(self):
        return self.retry_after


# --- Failed authentication, per client address ------------------------------------------------


def client_address(request):
    """The client's IP address: the connection's, or the entry TRUSTED_PROXIES reverse proxies
    added to X-Forwarded-For (entries further left are the client's own word, so never trusted).
    DRF's throttles (NUM_PROXIES) and django-axes (AXES_CLIENT_IP_CALLABLE) use the same rule."""
    meta = getattr(request, "META", {})
    remote = meta.get("REMOTE_ADDR", "")
    forwarded = meta.get("HTTP_X_FORWARDED_FOR", "")
    if settings.TRUSTED_PROXIES and forwarded:
        entries = [entry.strip() for entry in forwarded.split(",")]
        return entries[-min(settings.TRUSTED_PROXIES, len(entries))] or remote
    return remote


def _failure_window(address):
    """The sliding window's two Redis keys for `address` and the previous window's weight, as the
    client throttle computes them, over AUTH_FAILURE_WINDOW seconds."""
    duration = settings.AUTH_FAILURE_WINDOW
    window, elapsed = divmod(time.time(), duration)
    key = f"throttle:auth-failures:{address}"
    return [f"{key}:{int(window)}", f"{key}:{int(window) - 1}"], 1 - elapsed / duration


def failures_over_limit(address):
    """True once `address` has used up its AUTH_FAILURE_LIMIT (fails open without Redis)."""
    keys, weight = _failure_window(address)
    try:
        current, previous = (int(value or 0) for value in rate_limit_redis().mget(keys))
    except (redis.RedisError, OSError):
        logger.warning("rate-limit store unavailable; authentication not throttled", exc_info=True)
        return False
    return previous * weight + current >= settings.AUTH_FAILURE_LIMIT


def note_failure(address):
    """Count a failed authentication; False when it was over the limit. The client throttle's
    script counts only what it allows, so hammering does not push the window's end further out."""
    keys, weight = _failure_window(address)
    try:
        allowed = _sliding_window()(keys=keys, args=[settings.AUTH_FAILURE_LIMIT, weight, 2 * settings.AUTH_FAILURE_WINDOW])
    except (redis.RedisError, OSError):
        logger.warning("rate-limit store unavailable; failed authentication not counted", exc_info=True)
        return True
    return bool(allowed)


def _failed_auth_throttled():
    return exceptions.Throttled(
        wait=settings.AUTH_FAILURE_WINDOW, detail="Too many failed authentications from this address; try again later."
    )
