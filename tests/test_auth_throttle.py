"""Failed authentication is throttled per client address: API-key guesses get 429 `throttled`
after AUTH_FAILURE_LIMIT failures, and admin logins are locked out by django-axes."""

import pytest
from django.contrib.auth.models import User
from django.test import Client as HttpClient
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db


def get_images(key, address="198.51.100.7", **extra):
    api = APIClient(REMOTE_ADDR=address)
    return api.get("/api/v1/images/", HTTP_AUTHORIZATION=f"Bearer {key}", **extra)


def test_bad_api_keys_from_one_address_are_throttled_after_the_limit(settings, integrator):
    settings.AUTH_FAILURE_LIMIT = 5
    codes = [get_images(f"fd_guess_{n}").status_code for n in range(5)]
    assert codes == [401] * 5

    refused = get_images("fd_guess_6")
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "throttled"
    # No key is looked up any more from there, the right one included: guessing goes no further.
    assert get_images(integrator[1]).status_code == 429
    # Another address is not affected.
    assert get_images(integrator[1], address="198.51.100.8").status_code == 200
    assert get_images("fd_other_guess", address="198.51.100.8").status_code == 401


def test_a_valid_key_is_not_counted(settings, integrator):
    settings.AUTH_FAILURE_LIMIT = 2
    for _ in range(10):
        assert get_images(integrator[1]).status_code == 200
    assert get_images("fd_guess").status_code == 401


def test_a_forged_forwarded_for_does_not_escape_the_limit(settings):
    settings.AUTH_FAILURE_LIMIT = 3
    settings.TRUSTED_PROXIES = 0
    codes = [get_images("fd_guess", HTTP_X_FORWARDED_FOR=f"203.0.113.{n}").status_code for n in range(5)]
    assert codes == [401, 401, 401, 429, 429]


def test_behind_a_trusted_proxy_the_address_it_forwarded_is_counted(settings):
    settings.AUTH_FAILURE_LIMIT = 2
    settings.TRUSTED_PROXIES = 1
    proxy = "10.0.0.2"
    first = [get_images("fd_guess", address=proxy, HTTP_X_FORWARDED_FOR="forged, 203.0.113.1").status_code
             for _ in range(3)]
    assert first == [401, 401, 429]
    # Everyone else behind the same proxy still gets in: the proxy's own address is not counted.
    assert get_images("fd_guess", address=proxy, HTTP_X_FORWARDED_FOR="203.0.113.2").status_code == 401


def test_admin_logins_are_locked_out_after_failures(settings):
    settings.AXES_FAILURE_LIMIT = 3
    User.objects.create_superuser("ops", "ops@example.com", "right-password")
    browser = HttpClient(REMOTE_ADDR="198.51.100.9")

    def login(password):
        return browser.post("/admin/login/?next=/admin/", {"username": "ops", "password": password})

    assert [login(f"wrong-{n}").status_code for n in range(2)] == [200, 200]  # the form again, with an error
    assert login("wrong-3").status_code == 429
    # Locked out: the right password is refused too, and no session is opened.
    assert login("right-password").status_code == 429
    assert browser.get("/admin/").status_code == 302

    # Another address logs in.
    other = HttpClient(REMOTE_ADDR="198.51.100.10")
    response = other.post("/admin/login/?next=/admin/", {"username": "ops", "password": "right-password"})
    assert response.status_code == 302 and response["Location"] == "/admin/"
