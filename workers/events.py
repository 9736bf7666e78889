"""Callback events (`image.done`, `image.failed`, `batch.done`): their state, the dispatch of
retries, and one delivery attempt. The transport (signing, SSRF guard) is in callbacks.py.

An event's state lives on its image's or batch's row (api.models.CallbackState). Each attempt is a
compare-and-set on the attempt count, so a duplicated message never sends an attempt twice, and
retries wait in the database, not as countdowns pinned in the broker.
"""

import logging
import uuid
from datetime import timedelta

from django.conf import settings
from django.utils import timezone
from rest_framework.renderers import JSONRenderer

from api.models import Batch, CallbackAttempt, CallbackStatus, Image

from . import callbacks

logger = logging.getLogger(__name__)

# How long an attempt may take before the dispatcher assumes its sender died and sends another.
LEASE_SECONDS = 60


def pending_fields():
    """A new event: a fresh webhook-id, no attempts yet."""
    return {
        "callback_status": CallbackStatus.PENDING,
        "callback_event_id": f"msg_{uuid.uuid4().hex}",
        "callback_attempts": 0,
        "callback_last_status_code": None,
        # Whoever raised the event queues attempt one; the dispatcher steps in after the lease.
        "callback_next_attempt_at": timezone.now() + timedelta(seconds=LEASE_SECONDS),
    }


def _task_for(model):
    from . import tasks

    return tasks.send_callback if model is Image else tasks.send_batch_callback


def queue(model, pk, attempt=0):
    """Queue one delivery attempt; if the broker refuses, the dispatcher sends it after the lease."""
    try:
        _task_for(model).apply_async((str(pk),), {"attempt": attempt})
    except Exception:
        logger.warning("could not queue the callback of %s %s; the dispatcher will", model.__name__, pk, exc_info=True)


def _resource(target):
    from api.serializers import BatchSerializer, ImageSerializer

    if isinstance(target, Image):
        return ImageSerializer.represent(target, {})
    return BatchSerializer(target).data


def deliver(model, pk, attempt):
    """Make attempt number `attempt + 1` of the target's current event, and record it."""
    target = model.objects.select_related("client").filter(pk=pk).first()
    if target is None or target.callback_status != CallbackStatus.PENDING:
        return
    number = attempt + 1
    claimed = model.objects.filter(pk=pk, callback_status=CallbackStatus.PENDING, callback_attempts=attempt).update(
        callback_attempts=number, callback_next_attempt_at=timezone.now() + timedelta(seconds=LEASE_SECONDS)
    )
    if not claimed:
        return  # a duplicate message for an attempt already made
    target.callback_attempts = number

    event_type = target.event_type
    body = JSONRenderer().render({"type": event_type, "timestamp": timezone.now().isoformat(), "data": _resource(target)})
    result = callbacks.deliver(
        callbacks.kept_session(), target.callback_url, target.client.webhook_key, target.callback_event_id, body
    )

    owner = {"image": target} if model is Image else {"batch": target}
    CallbackAttempt.objects.create(
        **owner, event_id=target.callback_event_id, number=number,
        status_code=result.status_code, latency_ms=result.latency_ms, error=result.error,
    )
    fields = {"callback_last_status_code": result.status_code, "callback_next_attempt_at": None}
    delays = settings.CALLBACK_RETRY_DELAYS
    if result.delivered:
        fields["callback_status"] = CallbackStatus.DELIVERED
    elif result.gone or result.error.startswith("blocked") or number > len(delays):
        fields["callback_status"] = CallbackStatus.FAILED
    else:
        fields["callback_next_attempt_at"] = timezone.now() + timedelta(seconds=delays[number - 1])
    model.objects.filter(pk=pk, callback_event_id=target.callback_event_id).update(**fields)
    logger.info("callback %s (%s) attempt %d: %s %s", target.callback_event_id, event_type, number,
                result.status_code, result.error)


def dispatch_due(limit=200):
    """Queue the retries whose time has come, for images and batches. Returns how many."""
    now = timezone.now()
    sent = 0
    for model in (Image, Batch):
        due = model.objects.filter(
            callback_status=CallbackStatus.PENDING, callback_next_attempt_at__lte=now
        ).values_list("pk", "callback_attempts", "callback_next_attempt_at")[:limit]
        for pk, attempts, due_at in due:
            # Lease the row so the next tick does not queue it again while this attempt runs.
            leased = model.objects.filter(pk=pk, callback_next_attempt_at=due_at).update(
                callback_next_attempt_at=now + timedelta(seconds=LEASE_SECONDS)
            )
            if leased:
                queue(model, pk, attempt=attempts)
                sent += 1
    return sent
