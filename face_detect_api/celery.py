"""The Celery app, configured from Django's settings (the CELERY_ namespace)."""

import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "face_detect_api.settings")

app = Celery("face_detect_api")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["workers"])


@signals.setup_logging.connect
def _use_django_logging(**kwargs):
    """Workers and beat log through the settings' LOGGING (JSON lines, LOG_LEVEL), not Celery's
    own set-up: a receiver on this signal tells Celery to leave logging alone."""
    import logging.config

    from django.conf import settings

    logging.config.dictConfig(settings.LOGGING)
