"""Fixtures of the fault suite: a stack on its own database and bucket (on the session's S3
server, or a private one a test may stop), and the figures each test reports for RELIABILITY.md."""

import json
import uuid

import pytest

from tests.faults.harness import Database, Stack
from tests.testenv import TEST_ENV

FIGURES = []

# Short recovery timings so a fault heals within seconds, and a generous attempt cap since every
# kill costs an attempt.
RECOVERY_ENV = {
    "SWEEP_INTERVAL": "1",
    "ENQUEUE_GRACE_SECONDS": "2",
    "PROCESSING_DEADLINE_SECONDS": "30",
    "MAX_PIPELINE_ATTEMPTS": "5",
    "CALLBACK_RETRY_DELAYS": "1,1,2,2,4,4,8",
    "CALLBACK_DISPATCH_INTERVAL": "0.5",
}


@pytest.fixture
def make_stack(request, s3_server, rabbit_vhost):
    """make_stack(db_port=, s3=, **env) -> (stack, database): the session's vhost, a bucket on
    the session's S3 server (or on `s3`), a database of its own (on the server at `db_port`).
    Everything is stopped and dropped afterwards."""
    made = []

    def make(db_port=5432, s3=None, **env):
        name = request.node.name.removeprefix("test_")[:40]
        database = Database(f"fault_{uuid.uuid4().hex[:6]}", port=db_port)
        stack = Stack(name, {**RECOVERY_ENV, **env}, s3=s3 or s3_server, broker_url=TEST_ENV["CELERY_BROKER_URL"],
                      database=database)
        made.append(stack)
        stack.purge_queues()
        return stack, database

    yield make
    for stack in made:
        stack.close()


@pytest.fixture
def report(request):
    """report(**figures): keep a test's figures for the end-of-run summary and RELIABILITY.md."""
    def record(**figures):
        FIGURES.append({"test": request.node.name, **figures})

    return record


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    terminalreporter.section("fault injection figures")
    for row in FIGURES:
        terminalreporter.write_line(json.dumps(row))
