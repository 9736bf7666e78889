"""Optimizations of the upload path, applied as monkeypatches for `bench.ingest` (tuned variant).

Nothing here is imported by the platform: these are measured proposals. Each is named, can be
switched on alone with TUNED_PATCHES=name[,name...], and says what it trades.

  response     The upload's response body from one ImageSerializer kept per process (fields built
               and bound once; its context swapped per request) instead of a new ModelSerializer
               per response, which rebuilds its ~20 fields every time. The first response in
               every process is also built by a fresh serializer and compared; on any difference
               the patch switches itself off. Same bytes on the wire, whatever the fields are.
  auth         The API-key lookup cached per process for AUTH_CACHE_SECONDS (30 s) by key hash.
               Trade: a deactivated client or revoked key keeps working up to 30 s per process.
  throttle     The rate limit as one pipelined Redis `INCR` + `EXPIRE` on a fixed window instead
               of DRF's GET + SET of a pickled timestamp list, through one kept redis.Redis
               object (Django's RedisCache constructs a new client for every GET and SET). One
               round trip instead of two, and atomic (DRF's read-modify-write loses counts when
               workers race). Trade: a fixed window allows up to twice the rate across a window
               boundary.
  healthcheck  CONN_HEALTH_CHECKS off (bench/tuned_settings.py): no `SELECT 1` per request.
               Trade: after a PostgreSQL restart the first request of each worker fails (500)
               instead of reconnecting; Django then drops the connection.
  enqueued_at  enqueue() skips its `needs_fetch` EXISTS query for an image whose upload this
               process stored a moment ago (submit knows it is not a URL submission: the
               platform could pass `fetch` to enqueue instead), and writes
               the `UPDATE ... SET enqueued_at` after the publish as one raw statement with
               `synchronous_commit` off for that transaction only (set_config(..., true)): no
               ORM, and no WAL flush wait. Trade: if PostgreSQL crashes within ~0.6 s of it, the
               mark is lost and the sweeper re-sends the chain: a duplicate message, which the
               pipeline already tolerates (claim is compare-and-set on the image).
  batchmark    (with enqueued_at) the enqueued_at marks are not written by the request at all: a
               daemon thread per process writes them every 100 ms, all pending ids in one
               UPDATE (async commit). Trade: as enqueued_at, plus marks still pending when a
               worker is killed are lost (resent by the sweeper after ENQUEUE_GRACE_SECONDS).
  publish      For uploads (URL submissions keep the canvas, their chain starts with a fetch),
               the chain's first message published with `send_task` carrying the same embedded
               chain and errback (the same message, checked field by field against
               `pipeline.build(...).apply_async()` by bench.ingest_profile), from a producer
               this process keeps, instead of building Signatures and letting the canvas freeze
               and clone them. Trade: the message layout is written out here rather than left to
               Celery's canvas, so a Celery upgrade must be re-checked.
  fswrite      With STORAGE_BACKEND=filesystem, storage.put writes the bytes with one os.open/write
               under MEDIA_ROOT (parent directory created once per process) instead of Django's
               FileSystemStorage.save (name validation, makedirs, an fcntl lock, chunk loop).
               Same path, same bytes, same overwrite semantics; MinIO/S3 is unchanged.
  decode       inspect_image decodes JPEGs with Pillow's draft mode (DCT scaling to 1/8): every
               byte of the entropy-coded data is still read, so truncated files are still
               refused, at a quarter of the decode time. Other formats unchanged.
"""

import hashlib
import io
import logging
import threading
import time
import uuid
import warnings

from django.conf import settings

logger = logging.getLogger("bench.tuned")

ALL_PATCHES = ("response", "auth", "throttle", "healthcheck", "enqueued_at", "batchmark", "publish", "fswrite", "decode")
AUTH_CACHE_SECONDS = 30
AUTH_CACHE_MAX = 1024
CHAIN_STEPS = ("workers.tasks.save_faces", "workers.tasks.draw_annotation", "workers.tasks.send_callback")
ERRBACK_TASK = "workers.tasks.on_pipeline_error"
FIRST_TASK = "workers.tasks.detect_faces"

ACTIVE = set()  # the patches in effect; every patched function checks it on each call
_installed = False


def apply(names=None):
    """Install every patch (once) and switch on those named (default: settings.TUNED_PATCHES).
    Each patched function falls through to the platform's own code while its patch is off, so
    bench.ingest_profile can switch patches between passes in one process."""
    global _installed
    names = tuple(names if names is not None else settings.TUNED_PATCHES)
    if not _installed:
        for installer in (_patch_response, _patch_auth, _patch_throttle, _patch_enqueue, _patch_fswrite, _patch_decode):
            installer()
        _installed = True
    activate(names)
    return names


def activate(names):
    ACTIVE.clear()
    ACTIVE.update(name for name in names if name != "none")
    from django.db import connection

    # CONN_HEALTH_CHECKS is read when Django connects: set both the setting and the open connection.
    enabled = "healthcheck" not in ACTIVE and bool(getattr(settings, "PLATFORM_CONN_HEALTH_CHECKS", True))
    connection.settings_dict["CONN_HEALTH_CHECKS"] = enabled
    connection.health_check_enabled = enabled


# --- response -------------------------------------------------------------------------------


class _Body:
    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data


def _patch_response():
    import json

    from rest_framework.utils.encoders import JSONEncoder

    from api.models import Image
    from api.views import ImageViewSet

    original = ImageViewSet.get_serializer
    local = threading.local()
    state = {"checked": False, "on": True}

    def get_serializer(self, *args, **kwargs):
        image = args[0] if len(args) == 1 and not kwargs else None
        if not ("response" in ACTIVE and state["on"] and self.action == "create" and isinstance(image, Image)):
            return original(self, *args, **kwargs)
        serializer = getattr(local, "serializer", None)
        if serializer is None:
            # Built once per process and thread: a ModelSerializer otherwise builds its ~20
            # fields (model introspection, deepcopy of the declared ones) for every instance.
            serializer = local.serializer = self.get_serializer_class()(context=self.get_serializer_context())
            serializer.fields  # noqa: B018  (build and bind them now)
        serializer._context = self.get_serializer_context()
        data = serializer.to_representation(image)
        if not state["checked"]:
            state["checked"] = True
            real = original(self, image).data
            if json.dumps(real, cls=JSONEncoder) != json.dumps(data, cls=JSONEncoder):
                state["on"] = False
                logger.error("reused serializer's body differs from a fresh one's; patch off:\n%s\n%s", dict(real), data)
                return original(self, *args, **kwargs)
        return _Body(data)

    ImageViewSet.get_serializer = get_serializer


# --- auth -----------------------------------------------------------------------------------


def _patch_auth():
    from rest_framework import authentication, exceptions

    from api.auth import ApiKeyAuthentication
    from api.models import Client, hash_api_key

    cache = {}
    lock = threading.Lock()
    original = ApiKeyAuthentication.authenticate

    def authenticate(self, request):
        if "auth" not in ACTIVE:
            return original(self, request)
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Malformed Authorization header.")
        try:
            api_key = header[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed("Invalid API key.") from None
        digest = hash_api_key(api_key)
        now = time.monotonic()
        hit = cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0], None
        client = Client.objects.filter(api_key_hash=digest, is_active=True).first()
        if client is None:
            raise exceptions.AuthenticationFailed("Invalid API key.")
        with lock:
            if len(cache) >= AUTH_CACHE_MAX:
                cache.clear()
            cache[digest] = (client, now + AUTH_CACHE_SECONDS)
        return client, None

    ApiKeyAuthentication.authenticate = authenticate


# --- throttle -------------------------------------------------------------------------------


def _patch_throttle():
    from django.core.cache import cache

    from api.auth import ClientRateThrottle

    clients = threading.local()

    def redis_client():
        # One redis.Redis per process and thread over Django's connection pool: Django's
        # RedisCache builds a new one (and its ~170 response callbacks) for every operation.
        client = getattr(clients, "client", None)
        if client is None:
            client = clients.client = cache._cache.get_client(write=True)
        return client

    original_allow, original_wait = ClientRateThrottle.allow_request, ClientRateThrottle.wait

    def allow_request(self, request, view):
        if "throttle" not in ACTIVE:
            self.window_end = None
            return original_allow(self, request, view)
        if self.rate is None:
            return True
        key = self.get_cache_key(request, view)
        if key is None:
            return True
        self.now = time.time()
        window = int(self.now // self.duration)
        self.window_end = (window + 1) * self.duration
        self.history = []
        try:
            full_key = cache.make_and_validate_key(f"{key}:{window}")
            pipe = redis_client().pipeline(transaction=False)
            pipe.incr(full_key)
            pipe.expire(full_key, self.duration + 1)
            count, _ = pipe.execute()
        except Exception:  # the cache (Redis) is unreachable: fail open, as the platform does
            logger.warning("rate-limit cache unavailable; request allowed", exc_info=True)
            return True
        return count <= self.num_requests

    def wait(self):
        if getattr(self, "window_end", None) is None:
            return original_wait(self)
        return max(0.0, self.window_end - self.now)

    ClientRateThrottle.allow_request = allow_request
    ClientRateThrottle.wait = wait


# --- enqueued_at and publish ----------------------------------------------------------------


def chain_message_kwargs(app, image_id):
    """send_task arguments that give the message `pipeline.build(image_id).apply_async()` sends."""
    image_id = str(image_id)

    def errback():
        return {"task": ERRBACK_TASK, "args": [], "kwargs": {"image_id": image_id}, "options": {},
                "subtask_type": None, "immutable": False}

    chain = [
        {"task": name, "args": [], "kwargs": {},
         "options": {"task_id": str(uuid.uuid4()), "reply_to": app.thread_oid, "link_error": [errback()]},
         "subtask_type": None, "immutable": False}
        for name in reversed(CHAIN_STEPS)
    ]
    task_id = str(uuid.uuid4())
    return {
        "name": FIRST_TASK, "args": (image_id,), "kwargs": {}, "task_id": task_id, "root_id": task_id,
        "chain": chain, "link_error": [errback()], "ignore_result": True,
        "time_limit": app.conf.task_time_limit, "soft_time_limit": app.conf.task_soft_time_limit,
    }


class _Publisher:
    """One producer per process, taken from Celery's pool once and kept (not re-acquired for
    every message). kombu's publish retries reconnect it if the broker connection drops."""

    def __init__(self):
        self._local = threading.local()

    def producer(self, app):
        producer = getattr(self._local, "producer", None)
        if producer is None:
            producer = self._local.producer = app.producer_pool.acquire(block=True)
        return producer

    def drop(self):
        producer = getattr(self._local, "producer", None)
        self._local.producer = None
        if producer is not None:
            try:
                producer.release()
            except Exception:
                pass


_publisher = _Publisher()


def publish_chain(image_id, fetch=False):
    """Publish the pipeline's chain: the template for an upload, the canvas for a URL submission."""
    from celery import current_app

    from workers import pipeline

    if fetch:
        pipeline.build(image_id, fetch=True).apply_async()
        return
    app = current_app
    try:
        app.send_task(producer=_publisher.producer(app), **chain_message_kwargs(app, image_id))
    except Exception:
        _publisher.drop()
        raise


def _canvas_publish(image_id, fetch=False):
    from workers import pipeline

    pipeline.build(image_id, fetch=fetch).apply_async()


def _patch_enqueue():
    """enqueue() as the platform's, except: with `enqueued_at`, the `needs_fetch` EXISTS query is
    skipped for images whose upload this process stored a moment ago (it knows they need no
    fetch) and the enqueued_at mark is one raw statement committed asynchronously; with
    `publish`, the chain goes out through publish_chain."""
    from django.db import connection
    from django.utils import timezone

    from api.models import Image
    from workers import pipeline

    stored = set()
    original_store = pipeline._store
    original_enqueue = pipeline.enqueue

    def _store(data, inspected):
        image_id, row = original_store(data, inspected)
        if len(stored) > 10000:
            stored.clear()
        stored.add(image_id)
        return image_id, row

    table = connection.ops.quote_name(Image._meta.db_table)
    sql = (
        "WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true)) "
        f"UPDATE {table} SET enqueued_at = %s FROM async_commit WHERE id = %s"
    )

    def enqueue(image_id):
        known_upload = image_id in stored
        stored.discard(image_id)
        raw_update, publish = "enqueued_at" in ACTIVE, "publish" in ACTIVE
        if not (raw_update or publish):
            return original_enqueue(image_id)
        if known_upload and raw_update:
            needs_fetch = False
        else:
            needs_fetch = Image.objects.filter(pk=image_id, original_key="").exclude(source_url="").exists()
        try:
            (publish_chain if publish else _canvas_publish)(image_id, fetch=needs_fetch)
        except Exception:
            logger.warning("could not enqueue image %s; the sweeper will retry", image_id, exc_info=True)
            return False
        if raw_update and "batchmark" in ACTIVE:
            _marks.add(image_id, timezone.now())
        elif raw_update:
            with connection.cursor() as cursor:
                cursor.execute(sql, [timezone.now(), image_id])
        else:
            Image.objects.filter(pk=image_id).update(enqueued_at=timezone.now())
        return True

    pipeline._store = _store
    pipeline.enqueue = enqueue


class _MarkFlusher:
    """Writes pending enqueued_at marks in batches from a daemon thread (its own DB connection)."""

    INTERVAL = 0.1

    def __init__(self):
        self._lock = threading.Lock()
        self._pending = []
        self._thread = None

    def add(self, image_id, when):
        with self._lock:
            self._pending.append((image_id, when))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="enqueued-at-flusher", daemon=True)
                self._thread.start()

    def _run(self):
        import atexit

        atexit.register(self.flush)
        while True:
            time.sleep(self.INTERVAL)
            self.flush()

    def flush(self):
        from django.db import connection

        from api.models import Image

        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        table = connection.ops.quote_name(Image._meta.db_table)
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true)), "
                    "marks AS (SELECT unnest(%s::uuid[]) AS id, unnest(%s::timestamptz[]) AS at) "
                    f"UPDATE {table} SET enqueued_at = marks.at FROM marks, async_commit WHERE {table}.id = marks.id",
                    [[image_id for image_id, _ in batch], [when for _, when in batch]],
                )
        except Exception:
            logger.warning("could not write %d enqueued_at marks; the sweeper will resend them", len(batch), exc_info=True)
            connection.close()


_marks = _MarkFlusher()


# --- fswrite -------------------------------------------------------------------------------


def _patch_fswrite():
    import os

    from api import storage

    original = storage.put
    root = os.path.realpath(settings.MEDIA_ROOT)
    made = set()

    def put(key, data):
        if "fswrite" not in ACTIVE or settings.STORAGE_BACKEND != "filesystem":
            return original(key, data)
        path = os.path.normpath(os.path.join(root, key))  # no symlink resolution: no syscalls
        if not path.startswith(root + os.sep):
            return original(key, data)  # anything unusual goes the platform's way
        directory = os.path.dirname(path)
        try:
            if directory not in made:
                os.makedirs(directory, exist_ok=True)
                made.add(directory)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except Exception as error:
            raise storage._translate(error, key) from error

    storage.put = put


# --- decode ---------------------------------------------------------------------------------


def inspect_image_draft(data):
    """api.uploads.inspect_image with JPEGs decoded in draft mode (1/8 scale)."""
    import PIL.Image
    from PIL import UnidentifiedImageError

    from api import errors
    from api.uploads import (
        _EXIF_ORIENTATION,
        _QUARTER_TURNS,
        ALLOWED_FORMATS,
        InspectedImage,
    )

    if not data:
        raise errors.invalid_image("The image is empty.")
    if len(data) > settings.MAX_UPLOAD_BYTES:
        raise errors.image_too_large(f"The image is larger than {settings.MAX_UPLOAD_BYTES} bytes.")

    with warnings.catch_warnings():
        warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
        try:
            image = PIL.Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except (UnidentifiedImageError, PIL.Image.DecompressionBombWarning, PIL.Image.DecompressionBombError) as error:
            if isinstance(error, UnidentifiedImageError):
                raise errors.invalid_image("The file is not a JPEG, PNG, WebP or BMP image.") from None
            raise errors.image_too_large(f"The image has more than {settings.MAX_IMAGE_PIXELS} pixels.") from None
        except Exception:
            raise errors.invalid_image("The image header cannot be read.") from None

        with image:
            width, height = image.size
            if width * height > settings.MAX_IMAGE_PIXELS:
                raise errors.image_too_large(f"The image has more than {settings.MAX_IMAGE_PIXELS} pixels.")
            if min(width, height) < settings.MIN_IMAGE_SIDE:
                side = settings.MIN_IMAGE_SIDE
                raise errors.invalid_image(f"The image is smaller than {side}x{side} pixels.")
            if getattr(image, "n_frames", 1) > 1:
                raise errors.invalid_image("Animated or multi-frame images are not supported.")
            try:
                image_format = image.format
                if image_format == "JPEG":
                    # Reads the whole entropy-coded stream (truncation is still an error), but
                    # runs the inverse DCT at 1/8 scale. Size was taken above, before draft.
                    image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
                image.load()
                orientation = image.getexif().get(_EXIF_ORIENTATION)
            except Exception:
                raise errors.invalid_image("The image is truncated or corrupt.") from None

    if orientation in _QUARTER_TURNS:
        width, height = height, width
    return InspectedImage(format=image_format, width=width, height=height,
                          sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def _patch_decode():
    from api import views

    original = views.inspect_image

    def inspect_image(data):
        return (inspect_image_draft if "decode" in ACTIVE else original)(data)

    views.inspect_image = inspect_image
