"""`manage.py create_client NAME` prints the credentials once and stores the key hashed."""

import io
import json

import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from api.models import Client, hash_api_key

pytestmark = pytest.mark.django_db


def test_it_prints_the_credentials_as_json_and_stores_the_key_hashed():
    out = io.StringIO()
    call_command("create_client", "acme", stdout=out)

    printed = json.loads(out.getvalue())
    assert set(printed) == {"client", "api_key", "webhook_secret"}
    assert printed["client"] == "acme"
    assert printed["webhook_secret"].startswith("whsec_")
    client = Client.objects.get(name="acme")
    assert client.api_key_hash == hash_api_key(printed["api_key"])
    assert printed["api_key"] not in client.api_key_hash

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {printed['api_key']}")
    assert api.get("/api/v1/images/").status_code == 200


def test_a_duplicate_name_is_refused():
    call_command("create_client", "twice", stdout=io.StringIO())
    with pytest.raises(CommandError):
        call_command("create_client", "twice", stdout=io.StringIO())
