"""GET /api/v1/health/ checks the database, the broker and the storage for real."""

import pytest
from rest_framework.test import APIClient

from api import storage
from tests.testenv import free_port

pytestmark = pytest.mark.django_db


def test_it_is_ok_when_every_dependency_answers():
    response = APIClient().get("/api/v1/health/")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok", "storage": "ok"}}


def test_it_names_the_broker_when_the_broker_is_down(settings):
    settings.CELERY_BROKER_URL = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    response = APIClient().get("/api/v1/health/")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["broker"] != "ok"
    assert checks["database"] == checks["storage"] == "ok"


def test_it_names_the_storage_when_the_storage_is_down(settings):
    settings.MINIO_ENDPOINT = f"127.0.0.1:{free_port()}"
    storage._storage.reset()
    try:
        response = APIClient().get("/api/v1/health/")
    finally:
        storage._storage.reset()
    assert response.status_code == 503
    assert response.json()["checks"]["storage"] != "ok"


def test_an_upload_while_storage_is_down_answers_503_and_writes_nothing(api, settings):
    from api.models import Image
    from tests.conftest import upload

    settings.MINIO_ENDPOINT = f"127.0.0.1:{free_port()}"
    storage._storage.reset()
    try:
        response = upload(api)
    finally:
        storage._storage.reset()
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_unavailable"
    assert Image.objects.count() == 0
