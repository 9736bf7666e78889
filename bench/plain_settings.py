"""Settings of the baseline for `bench.ingest`: a plain DRF project doing the upload's work and
nothing else (no auth, no throttle, no middleware). Not part of the platform.

It reuses the platform's `api` app only for its `Image` table (same columns and indexes, so the
insert costs the same) and its storage classes (same file write or S3 PUT). Everything comes from
the environment `bench.ingest` sets: DATABASE_URL, STORAGE_BACKEND, MEDIA_ROOT, MINIO_*,
PLAIN_BROKER_URL, PLAIN_QUEUE, PLAIN_CLIENT_ID.
"""

import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent
DEBUG = False
SECRET_KEY = os.environ.get("SECRET_KEY", "bench-plain-not-secret")
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "rest_framework", "api"]
MIDDLEWARE = []
ROOT_URLCONF = "bench.plain_urls"
WSGI_APPLICATION = "bench.plain_wsgi.application"
USE_TZ = True
TIME_ZONE = "UTC"
USE_I18N = False
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Persistent connections like the platform (CONN_MAX_AGE=60), without per-request health checks.
DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"], conn_max_age=60)}

STORAGE_BACKEND = os.environ.get("STORAGE_BACKEND", "filesystem")
MEDIA_ROOT = Path(os.environ.get("MEDIA_ROOT", "/tmp/bench-plain-media"))
MINIO_ENDPOINT = os.environ.get("MINIO_ENDPOINT", "")
MINIO_ACCESS_KEY = os.environ.get("MINIO_ACCESS_KEY", "minioadmin")
MINIO_SECRET_KEY = os.environ.get("MINIO_SECRET_KEY", "minioadmin")
MINIO_BUCKET = os.environ.get("MINIO_BUCKET", "bench-plain")
MINIO_SECURE = False
STORAGES = {"default": {"BACKEND": "api.storage.build_storage"}}

FILE_UPLOAD_MAX_MEMORY_SIZE = 4 * 1024 * 1024

PLAIN_BROKER_URL = os.environ["PLAIN_BROKER_URL"]
PLAIN_QUEUE = os.environ.get("PLAIN_QUEUE", "plain_detect")
PLAIN_CLIENT_ID = int(os.environ["PLAIN_CLIENT_ID"])

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "DEFAULT_THROTTLE_CLASSES": [],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.MultiPartParser"],
    "UNAUTHENTICATED_USER": None,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
