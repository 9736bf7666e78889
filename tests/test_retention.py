"""Deleting images: one now through the API, or every expired one by the retention task."""

from datetime import timedelta

import pytest
from django.utils import timezone

from api import storage
from api.models import Image
from tests.conftest import upload
from workers import pipeline

pytestmark = pytest.mark.django_db(transaction=True)


def test_delete_removes_the_row_and_its_objects(api):
    image_id = upload(api).json()["id"]
    image = Image.objects.get(pk=image_id)
    storage.put(storage.annotated_key(image.pk, "JPEG"), b"annotated")

    response = api.delete(f"/api/v1/images/{image_id}/")

    assert response.status_code == 204
    assert not Image.objects.filter(pk=image_id).exists()
    assert not storage.exists(image.original_key)
    assert not storage.exists(storage.annotated_key(image.pk, "JPEG"))
    assert api.get(f"/api/v1/images/{image_id}/").status_code == 404


def test_a_client_cannot_delete_another_clients_image(api, client_factory):
    from rest_framework.test import APIClient

    image_id = upload(api).json()["id"]
    stranger = APIClient()
    stranger.credentials(HTTP_AUTHORIZATION=f"Bearer {client_factory()[1]}")

    assert stranger.delete(f"/api/v1/images/{image_id}/").status_code == 404
    assert Image.objects.filter(pk=image_id).exists()


def test_retention_deletes_only_expired_images(api, settings):
    settings.RETENTION_DAYS = 30
    old_id = upload(api, "clm_cage.jpg").json()["id"]
    new_id = upload(api, "clm_audrey.jpg").json()["id"]
    Image.objects.filter(pk=old_id).update(created_at=timezone.now() - timedelta(days=31))
    old_key = Image.objects.get(pk=old_id).original_key

    assert pipeline.purge_expired() == 1

    assert list(Image.objects.values_list("pk", flat=True)) == [Image.objects.get(pk=new_id).pk]
    assert not storage.exists(old_key)
