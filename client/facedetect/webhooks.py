"""Verification of the platform's callbacks (Standard Webhooks 1.0), without other libraries.

A callback is genuine when one of the `v1,` signatures in `webhook-signature` is
base64(HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{raw body}")), key being the
base64-decoded part of the client's `webhook_secret` after `whsec_`, and its timestamp is recent.
"""

import base64
import binascii
import hashlib
import hmac
import json
import re
import time

__all__ = ["DEFAULT_TOLERANCE", "WebhookVerificationError", "verify_webhook"]

SECRET_PREFIX = "whsec_"
# Five minutes either way, as in the Standard Webhooks reference libraries.
DEFAULT_TOLERANCE = 300
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


class WebhookVerificationError(Exception):
    """The request is not a genuine, recent callback; answer it with a 4xx and ignore it."""


def verify_webhook(headers, body, secret, tolerance=DEFAULT_TOLERANCE):
    """Check a received callback and return its JSON payload (`{"type", "timestamp", "data"}`).

    `headers`: any mapping of the request's headers (names in any case); `body`: the raw bytes as
    received, before any JSON parsing; `secret`: the client's `whsec_...` webhook secret.
    Raises `WebhookVerificationError` on a missing header, a timestamp more than `tolerance`
    seconds away from now (either way: replays and forged clocks), or no matching signature.
    """
    key = _secret_key(secret)
    if isinstance(body, str):
        body = body.encode("utf-8")
    header = {str(name).lower(): value for name, value in headers.items()}
    webhook_id = header.get("webhook-id")
    timestamp = header.get("webhook-timestamp")
    signatures = header.get("webhook-signature")
    if not (webhook_id and timestamp and signatures):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")

    timestamp = timestamp.strip()
    if not _TIMESTAMP.fullmatch(timestamp):
        raise WebhookVerificationError("webhook-timestamp is not integer Unix seconds")
    age = time.time() - int(timestamp)
    if age > tolerance:
        raise WebhookVerificationError(f"message timestamp too old ({age:.0f} s)")
    if age < -tolerance:
        raise WebhookVerificationError(f"message timestamp too new ({-age:.0f} s ahead)")

    signed = f"{webhook_id}.{timestamp}.".encode() + body
    expected = hmac.new(key, signed, hashlib.sha256).digest()
    # Several signatures may be sent (a secret being rotated); any v1 match will do.
    for candidate in signatures.split():
        version, _, encoded = candidate.partition(",")
        if version != "v1":
            continue
        try:
            received = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if hmac.compare_digest(expected, received):
            break
    else:
        raise WebhookVerificationError("no matching signature")

    try:
        return json.loads(body)
    except ValueError as error:  # signed, so this is the sender's bug rather than an attack
        raise WebhookVerificationError(f"the body is not JSON: {error}") from error


def _secret_key(secret):
    """The HMAC key: the base64 after `whsec_` (raw bytes are taken as the key itself)."""
    if isinstance(secret, (bytes, bytearray)):
        key = bytes(secret)
    else:
        encoded = secret.strip().removeprefix(SECRET_PREFIX)
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the webhook secret is not whsec_ followed by base64") from None
    if not key:
        raise ValueError("the webhook secret is empty")
    return key
