"""Optimizations of the upload path, applied as monkeypatches for `bench.ingest` (tuned variant).

Nothing here is imported by the platform: these are measured proposals. Each is named, can be
switched on alone with TUNED_PATCHES=name[,name...], and says what it trades.

  publish      For uploads (URL submissions keep the signatures, their first step is a fetch),
               the first message published with `send_task` carrying the same linked callback
               and errback (the same message, checked field by field against
               `pipeline.build(...).apply_async()` by bench.ingest_profile), from a producer
               this process keeps, instead of building Signatures and letting Celery turn them
               into a message. Trade: the message layout is written out here rather than left to
               Celery's canvas, so a Celery upgrade must be re-checked.
  fswrite      With STORAGE_BACKEND=filesystem, storage.put writes the bytes with one os.open/write
               under MEDIA_ROOT (parent directory created once per process) instead of Django's
               FileSystemStorage.save (name validation, makedirs, an fcntl lock, chunk loop).
               Same path, same bytes, same overwrite semantics; MinIO/S3 is unchanged.

Applied to the platform since, and so no longer patched here (BENCHMARKS.md has their before and
after): the health check of kept database connections as a socket poll instead of `SELECT 1`
(face_detect_api/postgresql/base.py), the enqueued_at mark written with the row instead of by a
second statement after the publish (workers/pipeline.py; it replaced the `batchmark` patch, which
wrote the marks in batches from a thread), one image serializer kept per thread for the response
(api/serializers.py), linked steps in place of the chain canvas (workers/pipeline.py), the
API-key lookup remembered per process (api/auth.py, AUTH_CACHE_SECONDS), the rate limit as one
atomic Redis call (api/auth.py), JPEG draft-mode decoding in the upload check (api/uploads.py),
and enqueue() told by submit whether a fetch is needed (workers/pipeline.py).
"""

import threading
import uuid

from django.conf import settings

ALL_PATCHES = ("publish", "fswrite")
NEXT_TASK = "workers.tasks.send_callback"
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
        for installer in (_patch_build, _patch_fswrite):
            installer()
        _installed = True
    activate(names)
    return names


def activate(names):
    ACTIVE.clear()
    ACTIVE.update(name for name in names if name != "none")


# --- publish ----------------------------------------------------------------


def chain_message_kwargs(app, image_id):
    """send_task arguments that give the message `pipeline.build(image_id).apply_async()` sends."""
    image_id = str(image_id)
    task_id = str(uuid.uuid4())

    def signature(name, **kwargs):
        return {"task": name, "args": [], "kwargs": kwargs, "options": {}, "subtask_type": None, "immutable": False}

    return {
        "name": FIRST_TASK, "args": (image_id,), "kwargs": {}, "task_id": task_id,
        "link": [signature(NEXT_TASK)], "link_error": [signature(ERRBACK_TASK, image_id=image_id)], "ignore_result": True,
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


def publish_chain(image_id):
    """Publish an upload's chain: the message of `pipeline.build(image_id)`, built by hand and sent
    through the kept producer."""
    from celery import current_app

    app = current_app
    try:
        app.send_task(producer=_publisher.producer(app), **chain_message_kwargs(app, image_id))
    except Exception:
        _publisher.drop()
        raise


class _HandPublished:
    """What the patched build() returns for an upload: apply_async() sends it by publish_chain."""

    def __init__(self, image_id):
        self.image_id = image_id

    def apply_async(self):
        publish_chain(self.image_id)


def _patch_build():
    """pipeline.build as the platform's, except that with `publish` an upload's chain goes out
    through publish_chain. enqueue() around it (its marks, its handling of a refused publish)
    stays the platform's own; URL submissions keep the signatures (their first step is a fetch)."""
    from workers import pipeline

    original_build = pipeline.build

    def build(image_id, fetch=False):
        if fetch or "publish" not in ACTIVE:
            return original_build(image_id, fetch=fetch)
        return _HandPublished(image_id)

    pipeline.build = build


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
