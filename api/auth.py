"""Bearer API-key authentication and the per-client rate limit."""

import logging

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
            raise exceptions.AuthenticationFailed("Invalid API key.") from None
        client = Client.objects.filter(api_key_hash=hash_api_key(api_key), is_active=True).first()
        if client is None:
            raise exceptions.AuthenticationFailed("Invalid API key.")
        return client, None

    def authenticate_header(self, request):
        # Makes DRF answer 401 (with WWW-Authenticate), not 403.
        return self.keyword


class ClientRateThrottle(throttling.SimpleRateThrottle):
    """Requests per client, counted in the shared cache; fails open if the cache is down,
    since refusing every request would be worse than not limiting for a while."""

    scope = "client"

    def get_cache_key(self, request, view):
        if isinstance(request.user, Client):
            return f"throttle:client:{request.user.pk}"
        return None

    def allow_request(self, request, view):
        try:
            return super().allow_request(request, view)
        except Exception:  # the cache (Redis) is unreachable
            logger.warning("rate-limit cache unavailable; request allowed", exc_info=True)
            return True
