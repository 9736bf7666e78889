"""Worker process hooks: a detection worker learns its engines from the queues it consumes
(settings.DETECT_QUEUES), imports TensorFlow once in the parent when MTCNN runs on it, and builds
its engines in each pool child right after the fork, so the first image is not slow. A worker
loads only the engines of its queues: a BlazeFace worker never imports TensorFlow. A worker that
consumes the `callbacks` queue runs the callback delivery loop (workers/delivery.py)."""

import logging

import PIL.Image
from celery import signals
from django.db import close_old_connections

from face_detect_api import logs

from . import detection  # sets TensorFlow's log level before anything imports it

logger = logging.getLogger(__name__)

_engines = ()
_runs_callbacks = False


@signals.celeryd_init.connect
def _patient_publishing(conf=None, **kwargs):
    from django.conf import settings

    conf.task_publish_retry_policy = settings.WORKER_PUBLISH_RETRY_POLICY


@signals.celeryd_after_setup.connect
def _note_queues(sender, instance, **kwargs):
    global _engines, _runs_callbacks
    from django.conf import settings

    consumed = instance.app.amqp.queues.consume_from
    _runs_callbacks = "callbacks" in consumed
    _engines = tuple(engine for engine, queue in settings.DETECT_QUEUES.items() if queue in consumed)
    if "mtcnn" in _engines and settings.DETECT_ENGINE == "tensorflow":
        # Importing (not using) TensorFlow before the fork is safe and saves every recycled child
        # the import; creating the model here would hang the children.
        import tensorflow  # noqa: F401


@signals.worker_process_init.connect
def _warm_up_detector(**kwargs):
    if not _engines:
        return
    blank = PIL.Image.new("RGB", (64, 64))
    for engine in _engines:
        detection.find_faces(blank, engine=engine)
    logger.info("detector ready: %s", ", ".join(_engines))


@signals.worker_ready.connect
def _start_callback_delivery(**kwargs):
    if _runs_callbacks:
        from . import delivery

        delivery.start()
        logger.info("callback delivery loop started")


@signals.worker_shutting_down.connect
def _stop_claiming_callbacks(**kwargs):
    """Warm shutdown begins: claim nothing more (called in a signal handler: must not block)."""
    from . import delivery

    delivery.stop_claiming()


@signals.worker_shutdown.connect
def _stop_callback_delivery(**kwargs):
    """Attempts in flight end within CALLBACK_TIMEOUT and are recorded before the process exits."""
    from . import delivery

    delivery.stop()


@signals.task_prerun.connect
def _bind_job(task=None, args=None, kwargs=None, **extra):
    """Every pipeline task's first argument is the image id, or a dict carrying it."""
    close_old_connections()
    logs.clear()
    first = (args or [None])[0]
    image_id = first.get("image_id") if isinstance(first, dict) else first
    if isinstance(image_id, str):
        logs.bind(image_id=image_id)
    elif kwargs and "image_id" in kwargs:
        logs.bind(image_id=kwargs["image_id"])


@signals.task_postrun.connect
def _unbind_job(**extra):
    close_old_connections()
    logs.clear()
