"""The pipeline's rules: building and sending the chain, and every state change of an image.

Each state change is a compare-and-set `UPDATE ... WHERE status = ...`: zero rows updated means
somebody else (another worker, the sweeper, an operator) got there first, and the caller backs off.
"""

import logging
import uuid
from datetime import timedelta

from celery import chain
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from api import storage
from face_detect_api import logs
from api.models import Face, Image

logger = logging.getLogger(__name__)

Status = Image.Status
CallbackStatus = Image.CallbackStatus
# How long a callback attempt may take before the dispatcher assumes its sender died.
CALLBACK_LEASE_SECONDS = 60


class PipelineError(Exception):
    """A permanent failure with the structured error the integrator will see."""

    def __init__(self, code, message):
        # Both in args, so Celery can rebuild the exception when it hands it to the errback.
        super().__init__(code, message)
        self.code = code
        self.message = message


class RequestIdConflict(Exception):
    """The client already used this request_id for different bytes."""


def _existing(client, request_id, sha256):
    if not request_id:
        return None
    image = Image.objects.filter(client=client, request_id=request_id).first()
    if image is not None and image.sha256 != sha256:
        raise RequestIdConflict(request_id)
    return image


def submit(client, data, inspected, options):
    """Accept an upload: store the original, commit the row, enqueue after the commit.

    Returns (image, created). The same request_id with the same bytes returns the existing image
    and starts nothing. If anything fails before the commit, the stored object is removed again.
    """
    request_id = options.get("request_id")
    existing = _existing(client, request_id, inspected.sha256)
    if existing is not None:
        logs.bind(image_id=existing.pk, request_id=request_id)
        return existing, False

    image_id = uuid.uuid4()
    logs.bind(image_id=image_id, request_id=request_id)
    key = storage.original_key(image_id, inspected.format)
    storage.put(key, data)
    try:
        with transaction.atomic():
            image = Image.objects.create(
                id=image_id, client=client, original_key=key, sha256=inspected.sha256,
                size_bytes=inspected.size_bytes, format=inspected.format,
                width=inspected.width, height=inspected.height, **options,
            )
            transaction.on_commit(lambda: enqueue(image_id))
    except IntegrityError:
        # A concurrent request with the same request_id committed first.
        _discard(key)
        existing = _existing(client, request_id, inspected.sha256)
        if existing is None:
            raise
        return existing, False
    except BaseException:
        _discard(key)
        raise
    return image, True


def _discard(key):
    """Remove an object the database never came to reference."""
    try:
        storage.delete(key)
    except storage.StorageUnavailable:
        logger.error("could not remove orphaned object %s", key, exc_info=True)


def build(image_id):
    """detect -> save faces -> draw -> callback, with one errback that fails the image."""
    from . import tasks

    image_id = str(image_id)
    return chain(
        tasks.detect_faces.si(image_id),
        tasks.save_faces.s(),
        tasks.draw_annotation.s(),
        tasks.send_callback.s(),
    ).on_error(tasks.on_pipeline_error.s(image_id=image_id))


def enqueue(image_id):
    """Publish the chain (with publisher confirms). Returns False if the broker did not take it;
    the image stays `queued` with no `enqueued_at`, and the sweeper sends it later."""
    try:
        build(image_id).apply_async()
    except Exception:
        logger.warning("could not enqueue image %s; the sweeper will retry", image_id, exc_info=True)
        return False
    Image.objects.filter(pk=image_id).update(enqueued_at=timezone.now())
    return True


def claim(image_id, task_id):
    """queued -> processing for this task. A redelivered message carries the same task id, so it
    may take back its own claim. Returns the image, or None if another worker owns it."""
    claimed = (
        Image.objects.filter(pk=image_id)
        .filter(Q(status=Status.QUEUED) | Q(status=Status.PROCESSING, task_id=task_id))
        .update(status=Status.PROCESSING, task_id=task_id, started_at=timezone.now(), attempts=F("attempts") + 1)
    )
    if not claimed:
        return None
    image = Image.objects.get(pk=image_id)
    if image.attempts > settings.MAX_PIPELINE_ATTEMPTS:
        raise PipelineError("poison", f"gave up after {settings.MAX_PIPELINE_ATTEMPTS} attempts")
    return image


def owned(image_id, token):
    """The image if it is still processing under this claim, else None."""
    return Image.objects.filter(pk=image_id, status=Status.PROCESSING, task_id=token).first()


def save_faces(image_id, token, faces, detect_ms):
    """Replace the image's faces in one transaction; a redelivered task leaves no duplicates."""
    with transaction.atomic():
        image = Image.objects.select_for_update().filter(pk=image_id, status=Status.PROCESSING, task_id=token).first()
        if image is None:
            return False
        Face.objects.filter(image=image).delete()
        Face.objects.bulk_create(
            Face(
                image=image,
                index=index,
                confidence=face["confidence"],
                keypoints=face["keypoints"],
                **face["box"],
            )
            for index, face in enumerate(faces)
        )
        image.face_count = len(faces)
        image.detect_ms = detect_ms
        image.save(update_fields=["face_count", "detect_ms"])
    return True


def _terminal_fields(image_has_callback):
    fields = {"finished_at": timezone.now(), "task_id": ""}
    if image_has_callback:
        fields.update(
            callback_status=CallbackStatus.PENDING,
            callback_event_id=f"msg_{uuid.uuid4().hex}",
            callback_attempts=0,
            callback_last_status_code=None,
            # The chain's own callback task goes first; the dispatcher steps in after the lease.
            callback_next_attempt_at=timezone.now() + timedelta(seconds=CALLBACK_LEASE_SECONDS),
        )
    return fields


def finish(image, token, annotated_key):
    """processing -> done under this claim."""
    return bool(
        Image.objects.filter(pk=image.pk, status=Status.PROCESSING, task_id=token).update(
            status=Status.DONE, annotated_key=annotated_key, error_code="", error_message="",
            **_terminal_fields(bool(image.callback_url)),
        )
    )


def fail(image_id, code, message):
    """queued|processing -> failed, then the `image.failed` callback. Returns True if it failed it."""
    image = Image.objects.filter(pk=image_id).only("callback_url").first()
    if image is None:
        return False
    failed = Image.objects.filter(pk=image_id, status__in=[Status.QUEUED, Status.PROCESSING]).update(
        status=Status.FAILED, error_code=code, error_message=message[:2000], **_terminal_fields(bool(image.callback_url))
    )
    if failed:
        logger.info("image %s failed: %s: %s", image_id, code, message)
        if image.callback_url:
            send_callback_later(image_id, attempt=0)
    return bool(failed)


def send_callback_later(image_id, attempt):
    """Queue one delivery attempt; if the broker refuses, the dispatcher sends it after the lease."""
    from . import tasks

    try:
        tasks.send_callback.apply_async((str(image_id),), {"attempt": attempt})
    except Exception:
        logger.warning("could not queue callback for %s; the dispatcher will", image_id, exc_info=True)


def rerun(image_id):
    """An operator's re-run: back to queued, old results cleared, chain sent again."""
    with transaction.atomic():
        updated = Image.objects.filter(pk=image_id, status__in=[Status.DONE, Status.FAILED]).update(
            status=Status.QUEUED, task_id="", attempts=0, error_code="", error_message="", face_count=None,
            started_at=None, finished_at=None, detect_ms=None, enqueued_at=None,
            callback_status=CallbackStatus.NONE, callback_next_attempt_at=None,
        )
        if updated:
            Face.objects.filter(image_id=image_id).delete()
            transaction.on_commit(lambda: enqueue(image_id))
    return bool(updated)


def resend_callback(image_id):
    """An operator's re-send: a new event for the finished image, delivered from attempt one."""
    image = Image.objects.filter(pk=image_id).first()
    if image is None or not image.is_finished or not image.callback_url:
        return False
    fields = _terminal_fields(True)
    fields.pop("finished_at")
    fields.pop("task_id")
    Image.objects.filter(pk=image_id).update(**fields)
    send_callback_later(image_id, attempt=0)
    return True


def delete(image):
    """Remove an image now: its objects first (StorageUnavailable leaves everything as it was),
    then its row, faces and attempts. A worker still busy with it finds the row gone and removes
    what it wrote (see draw_annotation)."""
    keys = [image.original_key, image.annotated_key, storage.annotated_key(image.pk, "JPEG"),
            storage.annotated_key(image.pk, "PNG")]
    for key in dict.fromkeys(k for k in keys if k):
        storage.delete(key)
    image.delete()


def purge_expired(limit=500):
    """Retention: delete images older than RETENTION_DAYS, objects included. Returns how many."""
    cutoff = timezone.now() - timedelta(days=settings.RETENTION_DAYS)
    expired = list(Image.objects.filter(created_at__lt=cutoff).order_by("created_at")[:limit])
    for image in expired:
        delete(image)
    return len(expired)


def dispatch_due_callbacks(limit=200):
    """Queue the retries whose time has come. Long delays wait here, in the database, rather than
    as countdowns pinned in the broker."""
    now = timezone.now()
    due = Image.objects.filter(
        callback_status=CallbackStatus.PENDING, callback_next_attempt_at__lte=now
    ).values_list("pk", "callback_attempts", "callback_next_attempt_at")[:limit]
    sent = 0
    for image_id, attempts, due_at in due:
        # Lease the row so the next tick does not queue it again while this attempt runs.
        leased = Image.objects.filter(pk=image_id, callback_next_attempt_at=due_at).update(
            callback_next_attempt_at=now + timedelta(seconds=CALLBACK_LEASE_SECONDS)
        )
        if leased:
            send_callback_later(image_id, attempt=attempts)
            sent += 1
    return sent


def sweep(limit=200):
    """Recover images no worker is moving: never enqueued (the broker was down), or stuck in
    `processing` past the deadline (their worker vanished). Returns how many were re-sent."""
    now = timezone.now()
    resent = 0
    never_sent = Image.objects.filter(
        status=Status.QUEUED, enqueued_at__isnull=True, created_at__lt=now - timedelta(seconds=settings.ENQUEUE_GRACE_SECONDS)
    ).values_list("pk", flat=True)[:limit]
    for image_id in never_sent:
        resent += enqueue(image_id)

    deadline = now - timedelta(seconds=settings.PROCESSING_DEADLINE_SECONDS)
    stale = Image.objects.filter(
        Q(status=Status.PROCESSING, started_at__lt=deadline) | Q(status=Status.QUEUED, enqueued_at__lt=deadline)
    ).values_list("pk", "status", "task_id", "attempts")[:limit]
    for image_id, status, task_id, attempts in stale:
        if attempts >= settings.MAX_PIPELINE_ATTEMPTS:
            fail(image_id, "poison", f"gave up after {attempts} attempts")
            continue
        # Only the claim we saw is released: a worker that just renewed it keeps it.
        released = Image.objects.filter(pk=image_id, status=status, task_id=task_id).update(
            status=Status.QUEUED, task_id="", enqueued_at=None
        )
        if released:
            resent += enqueue(image_id)
    return resent
