"""Callback events (`image.done`, `image.failed`, `batch.done`): their state, the claim of due
attempts and the record of each one. The transport (signing, SSRF guard) is in callbacks.py, the
loop that sends in delivery.py, the endpoints' circuit breakers in endpoints.py.

An event's state lives on its image's or batch's row (api.models.CallbackState), and the database
is the queue: an event is due when `callback_next_attempt_at` has passed. Claiming an attempt
raises the attempt count and leases the row (moves `callback_next_attempt_at` past the attempt's
timeout) in one statement, so two loops never send one attempt, and an attempt whose process died
is sent again once its lease has run out, under the same webhook-id.
"""

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from rest_framework.renderers import JSONRenderer

from api.models import Batch, CallbackAttempt, CallbackStatus, Image

from . import callbacks, endpoints

logger = logging.getLogger(__name__)

# Beyond CALLBACK_TIMEOUT, how long a claimed attempt may take to be recorded before another loop
# assumes its sender died and sends it again.
LEASE_MARGIN_SECONDS = 30
# An attempt put back because its endpoint had no room is due again after this.
DEFER_SECONDS = 1.0
# The part of a URL that names its endpoint, as SQL sees it: "scheme:" and "host[:port]" around the
# first two slashes, lower case (plain string functions: a regular expression per due row made a
# claim several times slower).
ORIGIN_SQL = "lower(split_part(callback_url, '/', 1) || split_part(callback_url, '/', 3))"

# Fair claim: per endpoint, at most its room (`rooms`, else `per_endpoint`) of its due rows,
# oldest first; rows another loop holds are skipped. The locking select repeats the conditions,
# which PostgreSQL re-checks on the latest version of a row that changed meanwhile.
CLAIM_SQL = f"""
WITH room AS MATERIALIZED (
    SELECT * FROM unnest(%(origins)s::text[], %(rooms)s::int[]) AS r(origin, room)
), due AS MATERIALIZED (
    SELECT id, {ORIGIN_SQL} AS origin,
           row_number() OVER (PARTITION BY {ORIGIN_SQL} ORDER BY callback_next_attempt_at) AS rank
    FROM {{table}}
    WHERE callback_status = 'pending' AND callback_next_attempt_at <= %(now)s
), picked AS MATERIALIZED (
    SELECT due.id FROM due LEFT JOIN room USING (origin) WHERE due.rank <= coalesce(room.room, %(per_endpoint)s)
), locked AS (
    SELECT t.id FROM {{table}} t JOIN picked USING (id)
    WHERE t.callback_status = 'pending' AND t.callback_next_attempt_at <= %(now)s
    ORDER BY t.callback_next_attempt_at LIMIT %(limit)s
    FOR UPDATE OF t SKIP LOCKED
)
UPDATE {{table}} SET callback_attempts = callback_attempts + 1, callback_next_attempt_at = %(lease)s
FROM locked WHERE {{table}}.id = locked.id
RETURNING {{table}}.id, {{table}}.callback_attempts
"""


def pending_fields():
    """A new event: a fresh webhook-id, no attempts yet, due at once."""
    return {
        "callback_status": CallbackStatus.PENDING,
        "callback_event_id": f"msg_{uuid.uuid4().hex}",
        "callback_attempts": 0,
        "callback_last_status_code": None,
        "callback_next_attempt_at": timezone.now(),
    }


def lease_seconds():
    return settings.CALLBACK_TIMEOUT + LEASE_MARGIN_SECONDS


def queue(model, pk):
    """Wake a delivery loop for a new event. Only a hint: the loops also look for due events every
    CALLBACK_DISPATCH_INTERVAL, so a message the broker refuses costs at most that long."""
    from . import tasks

    task = tasks.send_callback if model is Image else tasks.send_batch_callback
    try:
        task.apply_async((str(pk),))
    except Exception:
        logger.warning("could not wake the callback delivery for %s %s", model.__name__, pk, exc_info=True)


def origin(url):
    """The endpoint part of a URL exactly as ORIGIN_SQL computes it."""
    parts = url.split("/")
    return (parts[0] + (parts[2] if len(parts) > 2 else "")).lower()


@dataclass
class Attempt:
    """One claimed attempt, ready to send: the body shows the callback state as of sending."""

    model: type
    pk: object
    event_id: str
    number: int
    url: str
    key: bytes
    body: bytes
    endpoint: tuple = field(default=())
    # Set when the body could not be built: the attempt is recorded as not sent, with this.
    error: str = ""


@dataclass
class Outcome:
    """What became of a claimed attempt: sent (result), not sent (result says why, counts as an
    attempt) or deferred (put back, does not count)."""

    attempt: Attempt
    started_at: datetime
    result: callbacks.DeliveryResult | None = None
    sent: bool = True

    @property
    def deferred(self):
        return self.result is None


def claim(limit, per_endpoint, rooms=None):
    """Claim up to `limit` due attempts (images first, then batches), at most `per_endpoint` per
    endpoint, or what `rooms` ({origin: attempts}) leaves for the endpoints it names, and build
    their bodies. Returns (attempts, {endpoint: CallbackEndpoint}) for the endpoints they go to."""
    now = timezone.now()
    rooms = rooms or {}
    params = {"now": now, "lease": now + timedelta(seconds=lease_seconds()), "per_endpoint": per_endpoint,
              "origins": list(rooms), "rooms": [max(0, room) for room in rooms.values()]}
    attempts = []
    for model in (Image, Batch):
        room = limit - len(attempts)
        if room <= 0:
            break
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(CLAIM_SQL.format(table=connection.ops.quote_name(model._meta.db_table)),
                           {**params, "limit": room})
            numbers = dict(cursor.fetchall())
        if numbers:
            attempts += _build(model, numbers)
    states = endpoints.load({attempt.endpoint for attempt in attempts})
    return attempts, states


def _build(model, numbers):
    from api.serializers import BatchSerializer, ImageSerializer

    if model is Image:
        targets = Image.objects.select_related("client").prefetch_related("faces")
    else:
        targets = Batch.objects.select_related("client").prefetch_related("images__faces")
    renderer = JSONRenderer()
    built = []
    for target in targets.filter(pk__in=list(numbers)):
        attempt = Attempt(model, target.pk, target.callback_event_id, numbers[target.pk], target.callback_url,
                          b"", b"", endpoints.endpoint_of(target.callback_url))
        try:
            resource = ImageSerializer.represent(target, {}) if model is Image else BatchSerializer(target).data
            attempt.body = renderer.render(
                {"type": target.event_type, "timestamp": timezone.now().isoformat(), "data": resource}
            )
            attempt.key = target.client.webhook_key
        except Exception as error:  # one bad row must not hold up the others claimed with it
            logger.exception("callback %s: could not build the event", target.callback_event_id)
            attempt.error = f"not sent: could not build the event: {type(error).__name__}: {error}"[:1000]
        built.append(attempt)
    return built


def next_state(number, result, now):
    """The event's fields after attempt `number` ended with `result`."""
    fields = {"callback_last_status_code": result.status_code, "callback_next_attempt_at": None}
    delays = settings.CALLBACK_RETRY_DELAYS
    if result.delivered:
        fields["callback_status"] = CallbackStatus.DELIVERED
    elif result.gone or result.error.startswith("blocked") or number > len(delays):
        fields["callback_status"] = CallbackStatus.FAILED
    else:
        fields["callback_next_attempt_at"] = now + timedelta(seconds=delays[number - 1])
    return fields


# Each outcome's event moves on only if it is still the attempt that was claimed: same webhook-id,
# same attempt number, still pending (a re-send or a newer claim is left alone).
RESULTS_SQL = """
UPDATE {table} AS t SET callback_attempts = v.attempts, callback_status = v.status,
       callback_next_attempt_at = v.next_at,
       callback_last_status_code = CASE WHEN v.deferred THEN t.callback_last_status_code ELSE v.code END
FROM unnest(%(ids)s::uuid[], %(events)s::text[], %(numbers)s::int[], %(attempts)s::int[], %(statuses)s::text[],
            %(next)s::timestamptz[], %(codes)s::int[], %(deferred)s::bool[])
     AS v(id, event_id, number, attempts, status, next_at, code, deferred)
WHERE t.id = v.id AND t.callback_event_id = v.event_id AND t.callback_attempts = v.number
  AND t.callback_status = 'pending'
"""


def record(outcomes):
    """Write what became of claimed attempts, in one transaction: the attempts made or counted,
    each event's next state, deferred attempts put back (their count lowered again), and the
    endpoints' breakers."""
    now = timezone.now()
    with transaction.atomic():
        # An image or batch deleted meanwhile has nothing left to record against.
        present = {model: set(model.objects.filter(pk__in=[o.attempt.pk for o in outcomes if o.attempt.model is model])
                              .values_list("pk", flat=True)) for model in (Image, Batch)}
        rows = []
        updates = {Image: [], Batch: []}
        for outcome in outcomes:
            attempt = outcome.attempt
            if attempt.pk not in present[attempt.model]:
                continue
            if outcome.deferred:
                update = (attempt.number - 1, CallbackStatus.PENDING, now + timedelta(seconds=DEFER_SECONDS), None, True)
            else:
                result = outcome.result
                owner = {"image_id": attempt.pk} if attempt.model is Image else {"batch_id": attempt.pk}
                rows.append(CallbackAttempt(**owner, event_id=attempt.event_id, number=attempt.number,
                                            attempted_at=outcome.started_at, status_code=result.status_code,
                                            latency_ms=result.latency_ms, error=result.error))
                fields = next_state(attempt.number, result, now)
                update = (attempt.number, fields.get("callback_status", CallbackStatus.PENDING),
                          fields["callback_next_attempt_at"], result.status_code, False)
                logger.info("callback %s attempt %d: %s %s", attempt.event_id, attempt.number, result.status_code,
                            result.error)
            updates[attempt.model].append((attempt.pk, attempt.event_id, attempt.number, *update))
        with connection.cursor() as cursor:
            for model, values in updates.items():
                if values:
                    columns = [list(column) for column in zip(*values, strict=True)]
                    cursor.execute(RESULTS_SQL.format(table=connection.ops.quote_name(model._meta.db_table)), dict(
                        zip(("ids", "events", "numbers", "attempts", "statuses", "next", "codes", "deferred"), columns, strict=True)
                    ))
        CallbackAttempt.objects.bulk_create(rows)
        endpoints.apply([o for o in outcomes if o.sent and not o.deferred], now)
