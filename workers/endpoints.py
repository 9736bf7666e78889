"""Callback endpoints' circuit breakers: what the delivery loop does with an attempt to an
endpoint (scheme, host, port) given its state, and how attempts' results move that state.

The state lives in api.models.CallbackEndpoint, so every callbacks process sees the same breaker
and operators see it in the admin and in /metrics. See that model's docstring for the rules.
"""

from datetime import timedelta
from urllib.parse import urlsplit

from django.conf import settings

from api.models import CallbackEndpoint

State = CallbackEndpoint.State

SEND, PROBE, SKIP = "send", "probe", "skip"
# A failed probe doubles the time the endpoint stays open, this many times at most (16x).
MAX_DOUBLINGS = 4


def endpoint_of(url):
    """(scheme, host, port) of a callback URL, the default port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or (443 if scheme == "https" else 80)


def load(keys):
    """{endpoint: CallbackEndpoint} for those of `keys` that have a row."""
    if not keys:
        return {}
    hosts = {host for _scheme, host, _port in keys}
    rows = CallbackEndpoint.objects.filter(host__in=hosts)
    return {row.key: row for row in rows if row.key in keys}


def decide(row, now):
    """SEND an attempt to a closed endpoint, SKIP it (no network call) while the endpoint is open,
    and PROBE once the open period has passed."""
    if row is None or row.state == State.CLOSED:
        return SEND
    if row.open_until and row.open_until > now:
        return SKIP
    return PROBE


def is_failure(result):
    """What counts towards opening: a timeout, a refused or broken connection, a 5xx. A blocked
    address is the URL's fault, not the endpoint's."""
    if result.status_code is None:
        return not result.error.startswith("blocked")
    return result.status_code >= 500


def open_seconds(failed_probes):
    return settings.CALLBACK_BREAKER_SECONDS * 2 ** min(failed_probes, MAX_DOUBLINGS)


def skipped_error(row):
    since = row.state_since.isoformat(timespec="seconds")
    return f"not sent: circuit open since {since} after {row.consecutive_failures} failures ({row.last_error})"[:1000]


def apply(outcomes, now):
    """Move the breakers of the endpoints these sent attempts went to, in attempt order. Called
    inside record()'s transaction; rows are locked so that two processes do not interleave."""
    by_endpoint = {}
    for outcome in sorted(outcomes, key=lambda o: o.started_at):
        by_endpoint.setdefault(outcome.attempt.endpoint, []).append(outcome)
    failing = [key for key, items in by_endpoint.items() if any(is_failure(o.result) for o in items)]
    if failing:
        CallbackEndpoint.objects.bulk_create(
            [CallbackEndpoint(scheme=s, host=h, port=p, state_since=now) for s, h, p in failing], ignore_conflicts=True
        )
    hosts = {host for _scheme, host, _port in by_endpoint}
    rows = {row.key: row for row in CallbackEndpoint.objects.select_for_update().filter(host__in=hosts).order_by("pk")}
    for key, items in by_endpoint.items():
        row = rows.get(key)
        if row is None:
            continue  # never failed and all went well: nothing to write
        before = (row.state, row.consecutive_failures, row.open_until)
        for outcome in items:
            _step(row, outcome, now)
        if (row.state, row.consecutive_failures, row.open_until) != before:
            row.save()


def _step(row, outcome, now):
    result = outcome.result
    if not is_failure(result):
        if row.state == State.OPEN:
            row.state_since = now
        row.state, row.consecutive_failures, row.failed_probes, row.open_until = State.CLOSED, 0, 0, None
        return
    row.consecutive_failures += 1
    row.last_error = (result.error or f"HTTP {result.status_code}")[:1000]
    row.last_failure_at = outcome.started_at
    if row.state == State.OPEN:
        # Only an attempt started after the open period (a probe) opens it again, for longer;
        # stragglers sent before it opened just add to the count.
        if row.open_until is None or outcome.started_at >= row.open_until:
            row.failed_probes += 1
            row.open_until = now + timedelta(seconds=open_seconds(row.failed_probes))
    elif row.consecutive_failures >= settings.CALLBACK_BREAKER_FAILURES:
        row.state, row.state_since, row.failed_probes = State.OPEN, now, 0
        row.open_until = now + timedelta(seconds=open_seconds(0))
