"""Real worker processes for end-to-end tests: every worker pool of the Procfile (one per engine,
prefork, running the real detector), its threaded `callbacks` worker, and beat, all against the
test database, the session's RabbitMQ vhost and the S3 server. Started once for this package,
stopped after it."""

import os

import pytest


def worker_env():
    from django.db import connection

    db = connection.settings_dict
    return dict(os.environ, DATABASE_URL=f"postgres://{db['USER']}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}")


@pytest.fixture(scope="package")
def workers(django_db_setup, django_db_blocker, rabbit_vhost, s3_server):
    """Every worker and beat of the Procfile (stack.Platform, as `make run` starts them; the API
    is the tests' own Django client), two detector processes each, on the test database."""
    from face_detect_api.celery import app
    from stack import Platform

    app.control.purge()
    procs = Platform(worker_env(), name="e2e")
    try:
        procs.start_all(exclude=("api",), timeout=120, WORKER_CONCURRENCY="2")
        yield procs
    finally:
        procs.stop()
