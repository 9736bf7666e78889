"""The test rig: real PostgreSQL, RabbitMQ, Redis and an S3 server speaking the real protocol.

Everything a test session touches is its own: a RabbitMQ vhost, Redis databases 14-15, an S3
server started here (SeaweedFS, checking keys and signatures) with a fresh bucket, and
pytest-django's test database. A `make run` instance
on the same machine is left alone.
"""

import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = Path(__file__).resolve().parent / "photos"


from tests.testenv import RABBIT_VHOST, S3_ACCESS_KEY, S3_DIR, S3_PORT, S3_SECRET_KEY, TEST_DATABASE


def _rabbitmqctl(*args):
    env = dict(os.environ, ERL_EPMD_ADDRESS="127.0.0.1")
    return subprocess.run(["rabbitmqctl", *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="session")
def django_db_modify_db_settings():
    """The session's own test database (see tests/testenv.py)."""
    from django.db import connections

    connections["default"].settings_dict["TEST"]["NAME"] = TEST_DATABASE


@pytest.fixture(scope="session", autouse=True)
def rabbit_vhost():
    """A vhost of the session's own, so no other worker on this machine eats its messages."""
    _rabbitmqctl("add_vhost", RABBIT_VHOST)
    result = _rabbitmqctl("set_permissions", "-p", RABBIT_VHOST, "guest", ".*", ".*", ".*")
    assert result.returncode == 0, result.stderr
    yield RABBIT_VHOST
    _rabbitmqctl("delete_vhost", RABBIT_VHOST)


@pytest.fixture(scope="session", autouse=True)
def s3_server():
    """The session's own SeaweedFS S3 server (stack.S3Server) on the port the settings name; it
    is stopped at the end, and dies with this process should the session be killed."""
    from stack import S3Server

    server = S3Server(S3_DIR, port=S3_PORT, access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def onnx_models():
    """The ONNX engine's models (the default engine) and BlazeFace's, exported once if `make` has
    not yet."""
    from django.conf import settings

    from workers import blazeface
    from workers.onnx_engine import MODEL_FILES

    if not all((settings.ONNX_MODEL_DIR / name).is_file() for name in MODEL_FILES.values()):
        from workers.onnx_export import export

        export(settings.ONNX_MODEL_DIR, log=lambda *_: None)
    if not (blazeface.default_model_dir() / blazeface.MODEL_FILE).is_file():
        from workers.blazeface_export import export as export_blazeface

        export_blazeface(blazeface.default_model_dir(), log=lambda *_: None)
    return settings.ONNX_MODEL_DIR


@pytest.fixture(autouse=True)
def _fresh_rate_limits():
    """Throttle counters live in Redis and outlive a test's database; remembered API keys would
    outlive it too."""
    from api import auth

    auth.rate_limit_redis().flushdb()
    auth._known_clients = None


@pytest.fixture
def client_factory(db):
    from api.models import Client

    made = iter(range(1_000_000))

    def make(name=None):
        return Client.create_with_credentials(name or f"client-{next(made)}-{time.monotonic_ns()}")

    return make


@pytest.fixture
def integrator(client_factory):
    """(client, api_key)"""
    return client_factory()


@pytest.fixture
def api(integrator):
    """A DRF test client authenticated as `integrator`."""
    from rest_framework.test import APIClient

    api_client = APIClient()
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {integrator[1]}")
    return api_client


def photo(name):
    return (PHOTOS / name).read_bytes()


def upload(api, name="clm_cage.jpg", data=None, **fields):
    """POST a photo (by file name under tests/photos) to the images endpoint."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    content = photo(name) if data is None else data
    form = {"image": SimpleUploadedFile(name, content, content_type="application/octet-stream"), **fields}
    return api.post("/api/v1/images/", form, format="multipart")


def drain(queue_name):
    """Every message waiting on a queue of the session's vhost, removed from it, as
    (headers, [args, kwargs, embed]) pairs."""
    from django.conf import settings
    from kombu import Connection

    messages = []
    with Connection(settings.CELERY_BROKER_URL) as conn:
        queue = conn.SimpleQueue(queue_name)
        try:
            while True:
                message = queue.get(timeout=0.5)
                messages.append((message.headers, message.payload))
                message.ack()
        except queue.Empty:
            pass
        finally:
            queue.close()
    return messages


def wait_for(predicate, timeout=60, interval=0.2, message="condition"):
    """Poll until predicate() is truthy; every wait in the suite is bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


@pytest.fixture
def receiver():
    """A real HTTP receiver for callbacks on 127.0.0.1."""
    from tests.receiver import Receiver

    server = Receiver()
    yield server
    server.close()
