"""The test session's environment, loaded as a pytest plugin (`-p tests.testenv`) so it is in
place before pytest-django imports the settings."""

import atexit
import os
import secrets
import shutil
import socket
import tempfile

# Sessions on one machine (a developer's and a helper's, say) each get their own database and
# vhost, so they can run side by side.
SESSION = os.environ.get("TEST_SESSION") or str(os.getpid())
RABBIT_VHOST = f"face_detect_test_{SESSION}"
TEST_DATABASE = f"test_face_detect_{SESSION}"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


S3_PORT = free_port()
# The session's S3 server (tests/conftest.py starts it) keeps its data here and checks these keys.
S3_DIR = tempfile.mkdtemp(prefix="face-detect-s3-")
S3_ACCESS_KEY, S3_SECRET_KEY = f"test-{secrets.token_hex(6)}", secrets.token_urlsafe(24)
MEDIA_ROOT = tempfile.mkdtemp(prefix="face-detect-media-")
for _directory in (S3_DIR, MEDIA_ROOT):
    atexit.register(shutil.rmtree, _directory, ignore_errors=True)

# Read by the settings when pytest-django sets Django up, and passed on to worker processes.
TEST_ENV = {
    "STORAGE_BACKEND": "minio",
    "MINIO_ENDPOINT": f"127.0.0.1:{S3_PORT}",
    "MINIO_PUBLIC_ENDPOINT": "",
    "MINIO_ACCESS_KEY": S3_ACCESS_KEY,
    "MINIO_SECRET_KEY": S3_SECRET_KEY,
    "MINIO_BUCKET": "face-detect-test",
    "MEDIA_ROOT": MEDIA_ROOT,
    "CELERY_BROKER_URL": f"amqp://guest:guest@127.0.0.1:5672/{RABBIT_VHOST}",
    "CELERY_RESULT_BACKEND": "redis://127.0.0.1:6379/14",
    "REDIS_URL": "redis://127.0.0.1:6379/15",
    "CALLBACK_ALLOWED_NETWORKS": "127.0.0.1/32",
    "CALLBACK_RETRY_DELAYS": "1,1",
    "CALLBACK_TIMEOUT": "3",
    "CALLBACK_DISPATCH_INTERVAL": "0.5",
    "THROTTLE_RATE": "100000/s",
    "AUTH_FAILURE_LIMIT": "100000",
    "PUBLIC_BASE_URL": "http://testserver",
    "DEBUG": "false",
}
os.environ.update(TEST_ENV)
