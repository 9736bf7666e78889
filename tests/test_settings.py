"""Settings come from the environment only; a bad value stops start-up naming the variable."""

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


def test_minio_without_an_endpoint_is_refused():
    result = start_with(STORAGE_BACKEND="minio", MINIO_ENDPOINT="")
    assert result.returncode != 0
    assert "MINIO_ENDPOINT" in result.stderr


def test_no_variables_at_all_is_a_working_configuration():
    names = [line.split("=")[0] for line in (ROOT / "env.env").read_text().splitlines() if "=" in line and not line.startswith("#")]
    env = {k: v for k, v in os.environ.items() if k not in names}
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); from django.conf import settings as s; "
         "print(s.DATABASES['default']['NAME'], s.CELERY_BROKER_URL, s.STORAGE_BACKEND)"],
        cwd=ROOT, env={**env, "DJANGO_SETTINGS_MODULE": "face_detect_api.settings"}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["face_detect", "amqp://guest:guest@127.0.0.1:5672//", "filesystem"]


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
