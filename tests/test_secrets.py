"""Secrets stay secret: API keys and webhook secrets are never logged or returned after creation."""

import logging

import pytest
from rest_framework.test import APIClient

from tests.conftest import upload

pytestmark = pytest.mark.django_db(transaction=True)


def test_keys_and_secrets_appear_in_no_log_and_no_response(api, integrator, caplog):
    client, api_key = integrator
    caplog.set_level(logging.DEBUG)

    responses = [upload(api, request_id="s-1", callback_url="http://127.0.0.1:9/h"), api.get("/api/v1/images/")]
    image_id = responses[0].json()["id"]
    responses.append(api.get(f"/api/v1/images/{image_id}/"))
    wrong = APIClient()
    wrong.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key}x")
    responses.append(wrong.get("/api/v1/images/"))

    for secret in (api_key, client.webhook_secret, client.api_key_hash, client.webhook_secret.removeprefix("whsec_")):
        assert secret not in caplog.text
        for response in responses:
            assert secret not in response.content.decode()
