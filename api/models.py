"""The platform's records: integrators, their images, the faces found, and callback attempts."""

import base64
import hashlib
import secrets
import uuid

from django.db import models
from django.db.models import Q
from django.utils import timezone


def hash_api_key(api_key):
    """API keys are 256-bit random tokens, so one SHA-256 is enough to store them safely."""
    return hashlib.sha256(api_key.encode()).hexdigest()


class Client(models.Model):
    """An integrator. Its API key is stored hashed; its webhook secret signs callbacks."""

    name = models.CharField(max_length=100, unique=True)
    api_key_hash = models.CharField(max_length=64, unique=True, editable=False)
    webhook_secret = models.CharField(max_length=64, editable=False)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    # DRF's IsAuthenticated asks the authenticated principal this.
    is_authenticated = True

    def __str__(self):
        return self.name

    @classmethod
    def create_with_credentials(cls, name):
        """Create a client; returns (client, api_key). The key is never retrievable again."""
        api_key = "fd_" + secrets.token_urlsafe(32)
        webhook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        client = cls.objects.create(name=name, api_key_hash=hash_api_key(api_key), webhook_secret=webhook_secret)
        return client, api_key

    @property
    def webhook_key(self):
        """The HMAC key: the base64-decoded part of the secret after `whsec_`."""
        return base64.b64decode(self.webhook_secret.removeprefix("whsec_"))


class CallbackStatus(models.TextChoices):
    NONE = "none"
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class CallbackState(models.Model):
    """Where a callback event stands: the same for an image's and a batch's events."""

    CallbackStatus = CallbackStatus

    callback_url = models.URLField(max_length=2000, blank=True, default="")
    callback_status = models.CharField(max_length=10, choices=CallbackStatus.choices, default=CallbackStatus.NONE)
    # Identifies the current event (webhook-id): the same on every retry, new on a re-run.
    callback_event_id = models.CharField(max_length=64, blank=True, default="")
    callback_attempts = models.PositiveSmallIntegerField(default=0)
    callback_last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    callback_next_attempt_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True


class Batch(CallbackState):
    """Several images submitted together; one `batch.done` event once every one has ended.

    Status transitions: open -> done (compare-and-set, by whichever image ends last).
    """

    class Status(models.TextChoices):
        OPEN = "open"
        DONE = "done"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    client = models.ForeignKey(Client, on_delete=models.CASCADE, related_name="batches")
    status = models.CharField(max_length=6, choices=Status.choices, default=Status.OPEN)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["callback_status", "callback_next_attempt_at"], name="batch_callback_due")]
        verbose_name_plural = "batches"

    def __str__(self):
        return str(self.id)

    event_type = "batch.done"


class Image(CallbackState):
    """One submitted photo and its journey through the pipeline.

    Status transitions, each made by a compare-and-set update:
      queued -> processing       a worker claims it (detect_faces)
      processing -> done         faces saved and the annotated image stored (detect_faces)
      queued|processing -> failed   a permanent error, or the attempt cap (`poison`)
    An image submitted by URL has no stored original until `fetch_original` stores it (then
    width, height, format and sha256 are known too).
      processing -> queued       the sweeper reclaims an image whose worker vanished
      done|failed -> queued      an operator re-runs the pipeline from the admin
    """

    class Status(models.TextChoices):
        QUEUED = "queued"
        PROCESSING = "processing"
        DONE = "done"
        FAILED = "failed"

    class Annotation(models.TextChoices):
        BOXES = "boxes"
        BLUR = "blur"
        PIXELATE = "pixelate"

    class Engine(models.TextChoices):
        """The detector, each with its own queue and worker pool (settings.DETECT_QUEUES)."""

        MTCNN = "mtcnn"
        BLAZEFACE = "blazeface"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    client = models.ForeignKey(Client, on_delete=models.CASCADE, related_name="images")
    batch = models.ForeignKey(Batch, on_delete=models.SET_NULL, null=True, blank=True, related_name="images")
    request_id = models.CharField(max_length=128, null=True, blank=True)
    source_url = models.URLField(max_length=2000, blank=True, default="")

    original_key = models.CharField(max_length=200, blank=True, default="")
    annotated_key = models.CharField(max_length=200, blank=True, default="")
    sha256 = models.CharField(max_length=64, blank=True, default="")
    size_bytes = models.PositiveIntegerField(null=True, blank=True)
    format = models.CharField(max_length=10, blank=True, default="")
    width = models.PositiveIntegerField(null=True, blank=True)
    height = models.PositiveIntegerField(null=True, blank=True)

    min_face_size = models.PositiveIntegerField(default=20)
    min_confidence = models.FloatField(default=0.9)
    annotation = models.CharField(max_length=10, choices=Annotation.choices, default=Annotation.BOXES)
    engine = models.CharField(max_length=10, choices=Engine.choices, default=Engine.MTCNN)

    status = models.CharField(max_length=12, choices=Status.choices, default=Status.QUEUED)
    error_code = models.CharField(max_length=50, blank=True, default="")
    error_message = models.TextField(blank=True, default="")
    face_count = models.PositiveIntegerField(null=True, blank=True)
    # The Celery task id of the current claim: a redelivered message carries the same id.
    task_id = models.CharField(max_length=64, blank=True, default="")
    attempts = models.PositiveSmallIntegerField(default=0)

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    # When the pipeline's first message was handed to the broker. A new row is written with it set
    # and enqueue() clears it if the broker refuses; null means the sweeper must send the image.
    enqueued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    detect_ms = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["client", "request_id"], condition=Q(request_id__isnull=False), name="unique_request_id_per_client"
            ),
        ]
        indexes = [
            models.Index(fields=["client", "-created_at"], name="image_client_created"),
            models.Index(fields=["client", "status", "-created_at"], name="image_client_status_created"),
            models.Index(fields=["status", "created_at"], name="image_status_created"),
            models.Index(fields=["callback_status", "callback_next_attempt_at"], name="image_callback_due"),
        ]

    def __str__(self):
        return str(self.id)

    @property
    def is_finished(self):
        return self.status in (self.Status.DONE, self.Status.FAILED)

    @property
    def timings_ms(self):
        """Queue wait, detection and end-to-end time, as far as they are known."""
        timings = {"queued": None, "detect": self.detect_ms, "total": None}
        if self.started_at:
            timings["queued"] = _ms(self.started_at - self.created_at)
        if self.finished_at:
            timings["total"] = _ms(self.finished_at - self.created_at)
        return timings

    @property
    def event_type(self):
        return "image.done" if self.status == self.Status.DONE else "image.failed"


def _ms(delta):
    return max(0, round(delta.total_seconds() * 1000))


class Face(models.Model):
    """A face found in an image, in pixels of the upright original."""

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="faces")
    index = models.PositiveSmallIntegerField()
    x = models.IntegerField()
    y = models.IntegerField()
    width = models.IntegerField()
    height = models.IntegerField()
    confidence = models.FloatField()
    keypoints = models.JSONField()
    # SPEC 2.1, workers/face_quality.py; null on faces found before they existed.
    pose = models.JSONField(null=True, blank=True)
    quality = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["image", "index"]
        constraints = [models.UniqueConstraint(fields=["image", "index"], name="unique_face_index")]

    def __str__(self):
        return f"face {self.index} of {self.image_id}"


class CallbackAttempt(models.Model):
    """One POST to an integrator's callback URL, whatever came of it: an image's event or a batch's."""

    image = models.ForeignKey(Image, on_delete=models.CASCADE, null=True, related_name="callback_attempts_log")
    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, null=True, related_name="callback_attempts_log")
    event_id = models.CharField(max_length=64)
    number = models.PositiveSmallIntegerField()
    attempted_at = models.DateTimeField(default=timezone.now)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    error = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["attempted_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(image__isnull=False, batch__isnull=True) | Q(image__isnull=True, batch__isnull=False),
                name="attempt_for_an_image_or_a_batch",
            ),
        ]

    def __str__(self):
        return f"attempt {self.number} for {self.image_id or self.batch_id}"


class CallbackEndpoint(models.Model):
    """A receiver of callbacks, one per (scheme, host, port), and its circuit breaker.

    closed: attempts are sent. After CALLBACK_BREAKER_FAILURES timeouts, refused connections or
    5xx in a row it is open until `open_until`: due attempts to it are recorded as not sent and
    rescheduled, with no network call. Once `open_until` has passed, one attempt is sent as a
    probe: an answer closes it, another failure opens it again for twice as long (at most 16x).
    The delivery loop (workers/delivery.py) reads and writes it; operators see it in the admin.
    """

    class State(models.TextChoices):
        CLOSED = "closed"
        OPEN = "open"

    scheme = models.CharField(max_length=5)
    host = models.CharField(max_length=255)
    port = models.PositiveIntegerField()
    state = models.CharField(max_length=6, choices=State.choices, default=State.CLOSED)
    consecutive_failures = models.PositiveIntegerField(default=0)
    failed_probes = models.PositiveSmallIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    last_failure_at = models.DateTimeField(null=True, blank=True)
    # When the current state began: since when it is open (or closed again).
    state_since = models.DateTimeField(default=timezone.now)
    open_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["scheme", "host", "port"]
        constraints = [models.UniqueConstraint(fields=["scheme", "host", "port"], name="unique_callback_endpoint")]

    def __str__(self):
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def key(self):
        return (self.scheme, self.host, self.port)
