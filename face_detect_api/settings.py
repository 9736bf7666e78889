"""Settings for the face detection platform.

Every value comes from the environment, read once through the typed helpers below. A bad value
stops the process at start-up with a message naming the variable. `env.env` lists every variable
with its default; the defaults here are the ones `make run` uses, so `manage.py` run from a
checkout with nothing set talks to the same database, broker and S3 server.
"""

import ipaddress
import json
import math
import os
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


# --- Typed environment helpers ---------------------------------------------------------------


def _fail(name, value, expected):
    raise ImproperlyConfigured(f"Environment variable {name}={value!r} is invalid: expected {expected}")


def envstr(name, default):
    return os.environ.get(name, default)


def envbool(name, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    _fail(name, value, "true or false")


def envint(name, default, minimum=None, maximum=None):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        _fail(name, value, "an integer")
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        _fail(name, value, f"an integer in [{minimum}, {maximum}]")
    return number


def envfloat(name, default, minimum=None):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        _fail(name, value, "a number")
    if not math.isfinite(number) or (minimum is not None and number < minimum):
        _fail(name, value, f"a finite number >= {minimum}")
    return number


def envlist(name, default):
    value = os.environ.get(name)
    if value is None:
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]


def envdelays(name, default):
    items = envlist(name, default)
    try:
        delays = [int(item) for item in items]
    except ValueError:
        _fail(name, ",".join(items), "comma-separated whole seconds")
    if any(delay < 0 for delay in delays):
        _fail(name, ",".join(items), "non-negative seconds")
    return delays


def envnetworks(name, default):
    items = envlist(name, default)
    try:
        return [ipaddress.ip_network(item, strict=False) for item in items]
    except ValueError:
        _fail(name, ",".join(items), "comma-separated CIDR networks")


def envchoice(name, default, choices):
    value = os.environ.get(name) or default
    if value not in choices:
        _fail(name, value, " or ".join(choices))
    return value


def _secret_key():
    """SECRET_KEY from the environment, else one generated once and kept beside the checkout."""
    value = os.environ.get("SECRET_KEY")
    if value:
        return value
    key_file = BASE_DIR / ".secret_key"
    if not key_file.exists():
        key_file.touch(mode=0o600)
        key_file.write_text(secrets.token_urlsafe(64))
    return key_file.read_text().strip()


# --- Core ------------------------------------------------------------------------------------

DEBUG = envbool("DEBUG", False)
SECRET_KEY = _secret_key()
ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
PORT = envint("PORT", 8000, minimum=1, maximum=65535)
# Where integrators reach the API: used for the URLs inside callbacks, sent with no request at hand.
PUBLIC_BASE_URL = envstr("PUBLIC_BASE_URL", f"http://127.0.0.1:{PORT}").rstrip("/")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "api",
    "workers",
    # Admin logins: failed attempts recorded, the client address locked out (AXES_* below).
    "axes",
]

MIDDLEWARE = [
    "face_detect_api.logs.ClearJobContextMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes' documentation asks: it turns a lockout into its answer.
    "axes.middleware.AxesMiddleware",
]

AUTHENTICATION_BACKENDS = [
    # First, as django-axes' documentation asks: a locked-out address is refused before the password is checked.
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

ROOT_URLCONF = "face_detect_api.urls"
WSGI_APPLICATION = "face_detect_api.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"


# --- Security (production defaults; `manage.py check --deploy` passes with DEBUG=false) --------

SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = envbool("SECURE_SSL_REDIRECT", False)
SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_SECONDS > 0
SECURE_HSTS_PRELOAD = SECURE_HSTS_SECONDS > 0
# Container healthchecks and metric scrapers speak plain http inside the network.
SECURE_REDIRECT_EXEMPT = [r"^api/v1/health/$", r"^metrics$"]
SESSION_COOKIE_SECURE = envbool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = envbool("CSRF_COOKIE_SECURE", not DEBUG)
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS", [])
X_FRAME_OPTIONS = "DENY"


# --- Database --------------------------------------------------------------------------------

DATABASE_URL = envstr("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/face_detect")
try:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60, conn_health_checks=True)}
except ValueError as error:
    raise ImproperlyConfigured(f"Environment variable DATABASE_URL is invalid: {error}") from error
if DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
    raise ImproperlyConfigured("Environment variable DATABASE_URL must be a postgres:// URL")
# Django's backend, with a health check of kept connections that looks at the socket instead of
# sending `SELECT 1` (face_detect_api/postgresql/base.py says what it does and does not see).
DATABASES["default"]["ENGINE"] = "face_detect_api.postgresql"
DATABASES["default"].setdefault("OPTIONS", {})["connect_timeout"] = envint("DATABASE_CONNECT_TIMEOUT", 5, 1)


# --- Redis (rate limits shared by every API process: api/auth.py) ---------------------------

REDIS_URL = envstr("REDIS_URL", "redis://127.0.0.1:6379/1")


# --- Celery ----------------------------------------------------------------------------------

CELERY_BROKER_URL = envstr("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
CELERY_RESULT_BACKEND = envstr("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/0")
WORKER_CONCURRENCY = envint("WORKER_CONCURRENCY", os.cpu_count() or 1, minimum=1)
# A worker child is replaced after this many tasks, bounding TensorFlow's memory growth.
WORKER_MAX_TASKS_PER_CHILD = envint("WORKER_MAX_TASKS_PER_CHILD", 500, minimum=1)
WORKER_MAX_MEMORY_PER_CHILD_MB = envint("WORKER_MAX_MEMORY_PER_CHILD_MB", 1500, minimum=100)
TASK_SOFT_TIME_LIMIT = envint("TASK_SOFT_TIME_LIMIT", 60, minimum=1)
TASK_TIME_LIMIT = envint("TASK_TIME_LIMIT", 90, minimum=2)
if TASK_TIME_LIMIT <= TASK_SOFT_TIME_LIMIT:
    _fail("TASK_TIME_LIMIT", TASK_TIME_LIMIT, f"more than TASK_SOFT_TIME_LIMIT ({TASK_SOFT_TIME_LIMIT})")

CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_EXPIRES = 24 * 3600
# Nothing reads task results (chains pass values in the messages and the database is the
# record), so storing them would only make Redis a dependency of every job.
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND_ALWAYS_RETRY = True
CELERY_RESULT_BACKEND_MAX_RETRIES = 20
# CPU-bound work: a message is acknowledged only once its task has finished, a task whose worker
# died is redelivered, and no worker hoards messages another one could be running.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Celery lowers the prefetch count after a broker reconnect while tasks are still running, and
# raises it again from the acknowledgement callbacks. When the acknowledgement of a message from the
# lost connection failed, that path stalled the threads-pool callbacks worker for good: it consumed
# nothing more, and every later callback stayed pending (Celery 5.7; tests/faults:
# test_rabbitmq_restarted_while_a_callback_is_being_delivered). Without the reduction a worker
# takes its full prefetch (one message per process) right after reconnecting, and a message may wait
# in it until an old task ends; a redelivered copy of a task still running is stopped by the claim.
CELERY_WORKER_ENABLE_PREFETCH_COUNT_REDUCTION = False
CELERY_TASK_SOFT_TIME_LIMIT = TASK_SOFT_TIME_LIMIT
CELERY_TASK_TIME_LIMIT = TASK_TIME_LIMIT
CELERY_WORKER_MAX_TASKS_PER_CHILD = WORKER_MAX_TASKS_PER_CHILD
CELERY_WORKER_MAX_MEMORY_PER_CHILD = WORKER_MAX_MEMORY_PER_CHILD_MB * 1024
# Celery's Django fixup would otherwise close the database connection around every task (4 new
# PostgreSQL sessions an image, 30 ms of CPU: bench.pipeline). Workers instead treat each task like
# a request: close_old_connections() around it keeps a healthy connection for CONN_MAX_AGE and
# drops a broken one (workers/signals.py).
CELERY_DB_REUSE_MAX = 1_000_000
# Each detection engine has its own queue, consumed by its own worker pool (Procfile, compose,
# Kubernetes), so operators scale them apart and a worker loads only the engine it serves. MTCNN
# keeps the `detect` queue it always had: an upgrade strands no message already queued.
DETECT_QUEUES = {"mtcnn": "detect", "blazeface": "detect-blazeface"}
CELERY_TASK_DEFAULT_QUEUE = DETECT_QUEUES["mtcnn"]
CELERY_TASK_ROUTES = {
    "workers.tasks.send_callback": {"queue": "callbacks"},
    "workers.tasks.send_batch_callback": {"queue": "callbacks"},
    "workers.tasks.sweep_images": {"queue": "callbacks"},
    "workers.tasks.purge_expired_images": {"queue": "callbacks"},
}
# A publish the broker did not confirm raises, so the API knows the job is not yet enqueued.
CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True}
CELERY_BROKER_CONNECTION_TIMEOUT = 2
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# The API gives up on a publish quickly (the row is the record and the sweeper re-sends it); a
# worker handing a chain to its next step waits out a broker restart instead of failing the image.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
WORKER_PUBLISH_RETRY_POLICY = {"max_retries": 60, "interval_start": 0.5, "interval_step": 0.5, "interval_max": 2}
CELERY_WORKER_SEND_TASK_EVENTS = False
CELERY_BEAT_SCHEDULE = {
    "sweep-images": {"task": "workers.tasks.sweep_images", "schedule": envfloat("SWEEP_INTERVAL", 15.0, 0.5)},
    "purge-expired-images": {"task": "workers.tasks.purge_expired_images", "schedule": 3600.0},
}


# --- Storage ---------------------------------------------------------------------------------

MINIO_ENDPOINT = envstr("MINIO_ENDPOINT", "")
# No endpoint: the S3 server `make run` starts on this machine (SeaweedFS, stack/run.py), its data
# and identities file (keys generated once) under run/s3/ of the checkout.
LOCAL_S3 = not MINIO_ENDPOINT
LOCAL_S3_DIR = Path(envstr("LOCAL_S3_DIR", "") or BASE_DIR / "run" / "s3")
LOCAL_S3_PORT = envint("LOCAL_S3_PORT", 8333, minimum=1, maximum=65535)
STORAGE_BACKEND = envchoice("STORAGE_BACKEND", "minio", ("minio", "filesystem"))


def _local_s3_keys():
    """(access key, secret key) of the local S3 server's identities file, written on first use."""
    path = LOCAL_S3_DIR / "identities.json"
    if not path.exists():
        from stack.s3 import write_identities

        write_identities(path, f"local-{secrets.token_hex(8)}", secrets.token_urlsafe(30))
    credentials = json.loads(path.read_text())["identities"][0]["credentials"][0]
    return credentials["accessKey"], credentials["secretKey"]


_local_keys = _local_s3_keys() if LOCAL_S3 and STORAGE_BACKEND == "minio" else ("minioadmin", "minioadmin")
if LOCAL_S3:
    MINIO_ENDPOINT = f"127.0.0.1:{LOCAL_S3_PORT}"
MINIO_ACCESS_KEY = envstr("MINIO_ACCESS_KEY", "") or _local_keys[0]
MINIO_SECRET_KEY = envstr("MINIO_SECRET_KEY", "") or _local_keys[1]
MINIO_BUCKET = envstr("MINIO_BUCKET", "face-detect")
MINIO_SECURE = envbool("MINIO_SECURE", False)
# Presigned URLs are for clients: built for the address they reach the S3 server at (signed for
# that host), not the internal service name. The region is given so signing needs no request.
MINIO_PUBLIC_ENDPOINT = envstr("MINIO_PUBLIC_ENDPOINT", "") or MINIO_ENDPOINT
MINIO_PUBLIC_SECURE = envbool("MINIO_PUBLIC_SECURE", MINIO_SECURE)
MINIO_REGION = envstr("MINIO_REGION", "us-east-1")
MEDIA_ROOT = Path(envstr("MEDIA_ROOT", str(BASE_DIR / "media")))
# Downloads stream through the API; set true to answer 302 to a presigned URL instead.
DOWNLOAD_REDIRECT = envbool("DOWNLOAD_REDIRECT", False)
PRESIGNED_URL_SECONDS = envint("PRESIGNED_URL_SECONDS", 300, minimum=1, maximum=7 * 24 * 3600)

STORAGES = {
    "default": {"BACKEND": "api.storage.build_storage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}


# --- Uploads ---------------------------------------------------------------------------------

MAX_UPLOAD_BYTES = envint("MAX_UPLOAD_BYTES", 20 * 1024 * 1024, minimum=1)
MAX_IMAGE_PIXELS = envint("MAX_IMAGE_PIXELS", 50_000_000, minimum=1)
# Smallest side MTCNN's first network can look at.
MIN_IMAGE_SIDE = 12
MAX_BATCH_IMAGES = envint("MAX_BATCH_IMAGES", 50, minimum=1, maximum=1000)
# Form fields other than files, and JSON bodies: room for a full batch of image_urls (at most
# 2000 characters each) and the options around them; nothing legitimate comes near this.
DATA_UPLOAD_MAX_MEMORY_SIZE = 64 * 1024 + MAX_BATCH_IMAGES * 2048
DATA_UPLOAD_MAX_NUMBER_FIELDS = 20 + MAX_BATCH_IMAGES
FILE_UPLOAD_MAX_MEMORY_SIZE = 4 * 1024 * 1024
# Images submitted by URL are fetched by a worker within this many seconds, under MAX_UPLOAD_BYTES.
FETCH_TIMEOUT = envfloat("FETCH_TIMEOUT", 20.0, minimum=1)
MAX_BATCH_BYTES = envint("MAX_BATCH_BYTES", 100 * 1024 * 1024, minimum=1)
FILE_UPLOAD_HANDLERS = [
    "api.uploads.LimitedUploadHandler",
    "django.core.files.uploadhandler.MemoryFileUploadHandler",
    "django.core.files.uploadhandler.TemporaryFileUploadHandler",
]


# --- Detection -------------------------------------------------------------------------------

# onnx: MTCNN's own networks exported at install time and run by ONNX Runtime: no TensorFlow in the
# worker (its parent stays at ~115 MB instead of ~555, a recycled child is ready in 0.7 s instead of
# 1.2) and a slightly faster pipeline (bench.pipeline: 8.6 vs 7.8 img/s). tensorflow: the mtcnn
# package, networks compiled. Both find the same faces (tests/test_onnx_engine.py).
DETECT_ENGINE = envchoice("DETECT_ENGINE", "onnx", ("onnx", "tensorflow"))
ONNX_MODEL_DIR = Path(envstr("ONNX_MODEL_DIR", str(BASE_DIR / "models" / "mtcnn-onnx")))
BLAZEFACE_MODEL_DIR = Path(envstr("BLAZEFACE_MODEL_DIR", str(BASE_DIR / "models" / "blazeface-onnx")))
# Photos are downscaled so their long side is at most this before detection (see README).
DETECT_MAX_SIDE = envint("DETECT_MAX_SIDE", 1024, minimum=64)
DETECT_THREADS = envint("DETECT_THREADS", 1, minimum=1)


# --- Callbacks -------------------------------------------------------------------------------

CALLBACK_ALLOWED_NETWORKS = envnetworks("CALLBACK_ALLOWED_NETWORKS", [])
CALLBACK_RETRY_DELAYS = envdelays("CALLBACK_RETRY_DELAYS", ["5", "30", "120", "600", "1800", "3600", "10800", "21600"])
# The whole attempt, answer included: a receiver that dribbles its answer is cut here.
CALLBACK_TIMEOUT = envfloat("CALLBACK_TIMEOUT", 10.0, minimum=0.1)
# Opening the TCP (and TLS) connection alone: a dead host is given up on quickly.
CALLBACK_CONNECT_TIMEOUT = envfloat("CALLBACK_CONNECT_TIMEOUT", min(3.0, CALLBACK_TIMEOUT), minimum=0.1)
if CALLBACK_CONNECT_TIMEOUT > CALLBACK_TIMEOUT:
    _fail("CALLBACK_CONNECT_TIMEOUT", CALLBACK_CONNECT_TIMEOUT, f"at most CALLBACK_TIMEOUT ({CALLBACK_TIMEOUT})")
# How often the delivery loop looks for due attempts besides being woken (workers/delivery.py).
CALLBACK_DISPATCH_INTERVAL = envfloat("CALLBACK_DISPATCH_INTERVAL", 0.5, minimum=0.05)
# Attempts in flight at once in one callbacks process, and to one endpoint (scheme, host, port).
CALLBACK_MAX_IN_FLIGHT = envint("CALLBACK_MAX_IN_FLIGHT", 1000, minimum=1, maximum=10000)
CALLBACK_ENDPOINT_MAX_IN_FLIGHT = envint("CALLBACK_ENDPOINT_MAX_IN_FLIGHT", 20, minimum=1, maximum=10000)
# Circuit breaker: this many timeouts, refused connections or 5xx in a row open an endpoint for
# CALLBACK_BREAKER_SECONDS (doubled after each failed probe, at most 16x).
CALLBACK_BREAKER_FAILURES = envint("CALLBACK_BREAKER_FAILURES", 5, minimum=1)
CALLBACK_BREAKER_SECONDS = envfloat("CALLBACK_BREAKER_SECONDS", 30.0, minimum=0.1)


# --- Pipeline recovery -----------------------------------------------------------------------

# An image claimed by a worker longer than this is handed to another one.
PROCESSING_DEADLINE_SECONDS = envint("PROCESSING_DEADLINE_SECONDS", 300, minimum=10)
# An accepted image whose publish was never confirmed is re-sent after this.
ENQUEUE_GRACE_SECONDS = envint("ENQUEUE_GRACE_SECONDS", 30, minimum=1)
# After this many claims an image is failed as `poison` instead of looping.
MAX_PIPELINE_ATTEMPTS = envint("MAX_PIPELINE_ATTEMPTS", 3, minimum=1)
# Originals, annotated images and rows are deleted this many days after submission.
RETENTION_DAYS = envint("RETENTION_DAYS", 30, minimum=1)


# --- REST framework --------------------------------------------------------------------------

THROTTLE_RATE = envstr("THROTTLE_RATE", "50/s")
# A deactivated client's key keeps working at most this long in each API process.
AUTH_CACHE_SECONDS = envint("AUTH_CACHE_SECONDS", 5, minimum=0, maximum=300)
# Failed authentication, per client address: after this many bad API keys within the window the
# address gets 429 `throttled` (no key is looked up) until the window has slid past them.
AUTH_FAILURE_LIMIT = envint("AUTH_FAILURE_LIMIT", 20, minimum=1)
AUTH_FAILURE_WINDOW = envint("AUTH_FAILURE_WINDOW", 300, minimum=1)
# Reverse proxies in front of the API that append to X-Forwarded-For: the client address is the
# entry they added. 0: the connection's own address (X-Forwarded-For is ignored, it can be forged).
TRUSTED_PROXIES = envint("TRUSTED_PROXIES", 0, minimum=0, maximum=10)
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["api.auth.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_THROTTLE_CLASSES": ["api.auth.ClientRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {"client": THROTTLE_RATE},
    "DEFAULT_PAGINATION_CLASS": "api.pagination.Pagination",
    "PAGE_SIZE": envint("PAGE_SIZE", 50, minimum=1, maximum=1000),
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.MultiPartParser", "rest_framework.parsers.JSONParser"],
    "EXCEPTION_HANDLER": "api.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
    "NUM_PROXIES": TRUSTED_PROXIES,
}


# --- Admin login lockout (django-axes) --------------------------------------------------------

# After this many failed admin logins from one client address, that address is locked out for
# ADMIN_LOCKOUT_MINUTES (every new failure meanwhile starts the wait again).
AXES_FAILURE_LIMIT = envint("ADMIN_LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = envint("ADMIN_LOCKOUT_MINUTES", 15, minimum=1) / 60
AXES_LOCKOUT_PARAMETERS = ["ip_address"]
AXES_CLIENT_IP_CALLABLE = "api.auth.client_address"
AXES_RESET_ON_SUCCESS = True


SPECTACULAR_SETTINGS = {
    "TITLE": "Face detection platform",
    "DESCRIPTION": "Upload photos, get faces back with an annotated image and a signed callback. "
                   "Errors are {\"error\": {\"code\", \"message\", \"details\"}}.",
    "VERSION": "1.0.0",
    "OAS_VERSION": "3.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    # Swagger UI's files are served from the sidecar package, not fetched from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "WEBHOOKS": ["api.serializers.IMAGE_EVENT", "api.serializers.BATCH_EVENT"],
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "api.schema.postprocess"],
}


# --- Logging ---------------------------------------------------------------------------------

LOG_LEVEL = envchoice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"))
# json: one object a line for log collectors (docker compose, Kubernetes); text: one line a
# person can read, what `make run` uses.
LOG_FORMAT = envchoice("LOG_FORMAT", "json", ("json", "text"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"job": {"()": "face_detect_api.logs.JobContextFilter"}},
    "formatters": {
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s %(image_id)s %(request_id)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        },
        "text": {"()": "face_detect_api.logs.TextFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["job"]}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
