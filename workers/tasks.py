"""Celery tasks: thin bodies that take an image id, re-read the row and call the pipeline's rules.

Every task is idempotent on the image id: a redelivered message finds the work done, or redoes it
over fixed keys and replaced rows, and leaves no duplicate behind.
"""

import logging
import time
from datetime import timedelta

from celery import shared_task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone
from rest_framework.renderers import JSONRenderer

from api import storage
from api.models import CallbackAttempt, Image
from api.serializers import ImageSerializer

from . import callbacks, detection, drawing, pipeline
from .pipeline import PipelineError

logger = logging.getLogger(__name__)

# Storage or database trouble is worth waiting out; anything else fails the image.
TRANSIENT = (storage.StorageUnavailable, DatabaseError)
RETRY = {"autoretry_for": TRANSIENT, "retry_backoff": 2, "retry_backoff_max": 60, "max_retries": 6}


def _read_original(image):
    try:
        return storage.read(image.original_key)
    except storage.ObjectMissing:
        raise PipelineError("image_missing", "The stored original is gone.") from None


@shared_task(bind=True, **RETRY)
def detect_faces(self, image_id):
    """Claim the image and find its faces. Returns what save_faces needs."""
    image = pipeline.claim(image_id, self.request.id)
    if image is None:
        raise Ignore()  # another worker owns it, or it already ended: stop this chain quietly
    data = _read_original(image)
    try:
        upright = detection.load_upright_rgb(data)
    except detection.UndecodableImage as error:
        raise PipelineError("undecodable_image", f"The stored image cannot be decoded: {error}") from None
    started = time.perf_counter()
    faces = detection.find_faces(upright, image.min_face_size, image.min_confidence)
    detect_ms = round((time.perf_counter() - started) * 1000)
    logger.info("image %s: %d faces in %d ms", image_id, len(faces), detect_ms)
    return {"image_id": image_id, "token": self.request.id, "faces": faces, "detect_ms": detect_ms}


@shared_task(**RETRY)
def save_faces(detected):
    """Replace the image's Face rows with the detection's."""
    if not pipeline.save_faces(detected["image_id"], detected["token"], detected["faces"], detected["detect_ms"]):
        raise Ignore()
    return {"image_id": detected["image_id"], "token": detected["token"]}


@shared_task(**RETRY)
def draw_annotation(saved):
    """Draw boxes (or mask faces) on the original, store it under its fixed key, mark it done."""
    image = pipeline.owned(saved["image_id"], saved["token"])
    if image is None:
        raise Ignore()
    data = _read_original(image)
    faces = [face.as_dict() for face in image.faces.all()]
    output, output_format = drawing.annotate(data, faces, image.annotation)
    key = storage.annotated_key(image.pk, output_format)
    storage.put(key, output)
    if not pipeline.finish(image, saved["token"], key):
        if not Image.objects.filter(pk=image.pk).exists():
            storage.delete(key)  # deleted while we drew: leave no orphan behind
        raise Ignore()
    return str(image.pk)


@shared_task(autoretry_for=(DatabaseError,), retry_backoff=True, max_retries=5)
def send_callback(image_id, attempt=0):
    """One delivery attempt of the image's current event; retries are scheduled in the database."""
    image = Image.objects.select_related("client").filter(pk=image_id).first()
    if image is None or image.callback_status != Image.CallbackStatus.PENDING:
        return
    number = attempt + 1
    # Compare-and-set on the attempt count: a duplicate message for the same attempt backs off.
    claimed = Image.objects.filter(
        pk=image.pk, callback_status=Image.CallbackStatus.PENDING, callback_attempts=attempt
    ).update(callback_attempts=number, callback_next_attempt_at=timezone.now() + timedelta(seconds=pipeline.CALLBACK_LEASE_SECONDS))
    if not claimed:
        return
    image.callback_attempts = number

    payload = {
        "type": image.event_type,
        "timestamp": timezone.now().isoformat(),
        "data": ImageSerializer(image).data,
    }
    body = JSONRenderer().render(payload)
    session = callbacks.guarded_session()
    try:
        result = callbacks.deliver(session, image.callback_url, image.client.webhook_key, image.callback_event_id, body)
    finally:
        session.close()

    CallbackAttempt.objects.create(
        image=image, event_id=image.callback_event_id, number=number,
        status_code=result.status_code, latency_ms=result.latency_ms, error=result.error,
    )
    fields = {"callback_last_status_code": result.status_code, "callback_next_attempt_at": None}
    delays = settings.CALLBACK_RETRY_DELAYS
    if result.delivered:
        fields["callback_status"] = Image.CallbackStatus.DELIVERED
    elif result.gone or result.error.startswith("blocked") or number > len(delays):
        fields["callback_status"] = Image.CallbackStatus.FAILED
    else:
        fields["callback_next_attempt_at"] = timezone.now() + timedelta(seconds=delays[number - 1])
    Image.objects.filter(pk=image.pk, callback_event_id=image.callback_event_id).update(**fields)
    logger.info("callback %s attempt %d for %s: %s %s", image.callback_event_id, number, image_id,
                result.status_code, result.error)


@shared_task
def on_pipeline_error(request, exc, traceback, image_id):
    """The chain's errback: fail the image with a structured error and send `image.failed`."""
    if isinstance(exc, PipelineError):
        code, message = exc.code, exc.message
    elif isinstance(exc, SoftTimeLimitExceeded):
        code, message = "timeout", "Processing took longer than the time limit."
    elif isinstance(exc, storage.StorageUnavailable):
        code, message = "storage_unavailable", "The storage stayed unreachable through every retry."
    else:
        code, message = "internal_error", f"{type(exc).__name__}: {exc}"
        logger.error("image %s: unexpected error in %s", image_id, request.task, exc_info=exc)
    pipeline.fail(image_id, code, message)


@shared_task
def dispatch_due_callbacks():
    """Beat: queue callback retries whose delay has passed."""
    return pipeline.dispatch_due_callbacks()


@shared_task
def purge_expired_images():
    """Beat: delete images past RETENTION_DAYS."""
    return pipeline.purge_expired()


@shared_task
def sweep_images():
    """Beat: re-send images that were never enqueued or whose worker vanished."""
    return pipeline.sweep()
