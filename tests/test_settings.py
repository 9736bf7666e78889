"""Settings come from the environment only; a bad value stops start-up naming the variable."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def start_with(**env):
    """Import the settings in a fresh interpreter with these variables; returns the result."""
    clean = {k: v for k, v in os.environ.items() if k not in env}
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT, env={**clean, **env, "DJANGO_SETTINGS_MODULE": "face_detect_api.settings"},
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize(
    "name,value",
    [
        ("DEBUG", "maybe"),
        ("PORT", "eighty"),
        ("MAX_UPLOAD_BYTES", "-5"),
        ("CALLBACK_RETRY_DELAYS", "5,soon"),
        ("CALLBACK_ALLOWED_NETWORKS", "10.0.0.0/33"),
        ("CALLBACK_TIMEOUT", "nan"),
        ("STORAGE_BACKEND", "floppy"),
        ("LOCAL_S3_PORT", "99999"),
        ("MINIO_PUBLIC_SECURE", "perhaps"),
        ("DATABASE_URL", "mysql://x@y/z"),
        ("WORKER_CONCURRENCY", "0"),
        ("TASK_TIME_LIMIT", "10"),
        ("CALLBACK_CONNECT_TIMEOUT", "30"),
        ("CALLBACK_ENDPOINT_MAX_IN_FLIGHT", "0"),
        ("CALLBACK_BREAKER_SECONDS", "soon"),
        ("AUTH_FAILURE_LIMIT", "many"),
        ("ADMIN_LOGIN_FAILURE_LIMIT", "0"),
        ("TRUSTED_PROXIES", "-1"),
    ],
)
def test_a_bad_value_stops_start_up_naming_the_variable(name, value):
    result = start_with(**{name: value})
    assert result.returncode != 0
    assert name in result.stderr.splitlines()[-1]


def test_without_an_endpoint_storage_is_the_local_s3_server_of_make_run():
    """The keys are those of the identities file the local server checks (run/s3/), so
    `manage.py` from the checkout reaches the storage `make run` started."""
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); from django.conf import settings as s; "
         "print(s.STORAGE_BACKEND, s.MINIO_ENDPOINT, s.MINIO_PUBLIC_ENDPOINT, s.MINIO_ACCESS_KEY, s.MINIO_SECRET_KEY)"],
        cwd=ROOT, env={**{k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "STORAGE_"))},
                       "DJANGO_SETTINGS_MODULE": "face_detect_api.settings", "LOCAL_S3_PORT": "18333"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    backend, endpoint, public, access_key, secret_key = result.stdout.split()
    assert (backend, endpoint, public) == ("minio", "127.0.0.1:18333", "127.0.0.1:18333")
    credentials = json.loads((ROOT / "run" / "s3" / "identities.json").read_text())["identities"][0]["credentials"][0]
    assert (access_key, secret_key) == (credentials["accessKey"], credentials["secretKey"])


def test_no_variables_at_all_is_a_working_configuration():
    names = [line.split("=")[0] for line in (ROOT / "env.env").read_text().splitlines() if "=" in line and not line.startswith("#")]
    env = {k: v for k, v in os.environ.items() if k not in names}
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); from django.conf import settings as s; "
         "print(s.DATABASES['default']['NAME'], s.CELERY_BROKER_URL, s.STORAGE_BACKEND)"],
        cwd=ROOT, env={**env, "DJANGO_SETTINGS_MODULE": "face_detect_api.settings"}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["face_detect", "amqp://guest:guest@127.0.0.1:5672//", "minio"]


def test_the_production_settings_of_env_env_pass_the_deploy_check():
    env = dict(os.environ)
    for line in (ROOT / "env.env").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            name, value = line.split("=", 1)
            env[name] = value
    # What an operator must add: a real secret, and the local services instead of compose's names.
    env.update(SECRET_KEY="x" * 20 + "a-long-random-production-secret-0123456789", DATABASE_URL=os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/face_detect"))
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
