"""Celery tasks: thin bodies that take an image id, re-read the row and call the pipeline's rules.

Every task is idempotent on the image id: a redelivered message finds the work done, or redoes it
over fixed keys and replaced rows, and leaves no duplicate behind.
"""

import logging
import time

from celery import shared_task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from django.db import DatabaseError

from api import storage
from api.errors import ApiError
from api.models import Image
from api.uploads import inspect_image

from . import delivery, detection, drawing, face_quality, fetch, pipeline
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


@shared_task(autoretry_for=(*TRANSIENT, fetch.FetchUnavailable), retry_backoff=2, retry_backoff_max=60, max_retries=4)
def fetch_original(image_id):
    """For an image submitted by URL: fetch it through the SSRF guard, check it exactly as an
    upload is checked, store it. A redelivered task finds it stored and does nothing."""
    image = Image.objects.filter(pk=image_id, status=Image.Status.QUEUED).first()
    if image is None:
        raise Ignore()
    if image.original_key:
        return
    data = fetch.fetch(image.source_url)
    try:
        inspected = inspect_image(data)
    except ApiError as error:
        raise PipelineError(error.code, error.message) from None
    pipeline.store_fetched(image.pk, data, inspected)


@shared_task(bind=True, **RETRY)
def detect_faces(self, image_id):
    """Claim the image, find its faces, draw them, store the annotated image, then save the faces
    and mark it done in one transaction.

    One task for the three steps: the photo is read and decoded once, and one message is
    published per image instead of three. The final write checks the claim, so a worker that lost
    it (a redelivery, the sweeper, an operator's re-run) saves nothing. Returns the image id for
    the callback, the next task of the chain.
    """
    # A message redelivered after its worker died counts as a new attempt; a retry after a
    # transient error does not.
    new_attempt = not self.request.retries or bool((self.request.delivery_info or {}).get("redelivered"))
    token = self.request.id
    image = pipeline.claim(image_id, token, new_attempt=new_attempt)
    if image is None:
        raise Ignore()  # another worker owns it, or it already ended: stop this chain quietly
    data = _read_original(image)
    try:
        upright = detection.load_upright_rgb(data)
    except detection.UndecodableImage as error:
        raise PipelineError("undecodable_image", f"The stored image cannot be decoded: {error}") from None
    started = time.perf_counter()
    faces = detection.find_faces(upright, image.min_face_size, image.min_confidence, engine=image.engine)
    face_quality.describe_all(upright, faces)
    detect_ms = round((time.perf_counter() - started) * 1000)
    logger.info("image %s: %d faces in %d ms", image_id, len(faces), detect_ms)
    output, output_format = drawing.annotate_image(upright, faces, image.annotation, image.format)
    key = storage.annotated_key(image.pk, output_format)
    storage.put(key, output)
    if not pipeline.finish(image, token, faces, detect_ms, key):
        if not Image.objects.filter(pk=image.pk).exists():
            storage.delete(key)  # deleted while we drew: leave no orphan behind
        raise Ignore()
    return str(image.pk)


@shared_task
def send_callback(image_id, attempt=0):
    """Wake the callbacks worker's delivery loop for the image's new event. The loop claims it
    from the database (workers/delivery.py), so a lost or duplicated message changes nothing."""
    delivery.wake()


@shared_task
def send_batch_callback(batch_id, attempt=0):
    """The same for a batch's `batch.done` event."""
    delivery.wake()


@shared_task
def on_pipeline_error(request, exc, traceback, image_id):
    """The chain's errback: fail the image with a structured error and send `image.failed`."""
    if isinstance(exc, PipelineError):
        code, message = exc.code, exc.message
    elif isinstance(exc, SoftTimeLimitExceeded):
        code, message = "timeout", "Processing took longer than the time limit."
    elif isinstance(exc, storage.StorageUnavailable):
        code, message = "storage_unavailable", "The storage stayed unreachable through every retry."
    elif isinstance(exc, fetch.FetchUnavailable):
        code, message = "fetch_failed", f"The image URL could not be fetched: {exc}"
    else:
        code, message = "internal_error", f"{type(exc).__name__}: {exc}"
        logger.error("image %s: unexpected error in %s", image_id, request.task, exc_info=exc)
    pipeline.fail(image_id, code, message)


@shared_task
def purge_expired_images():
    """Beat: delete images past RETENTION_DAYS."""
    return pipeline.purge_expired()


@shared_task
def sweep_images():
    """Beat: re-send images that were never enqueued or whose worker vanished."""
    return pipeline.sweep()
