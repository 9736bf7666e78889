"""Fixtures of the fault suite: a stack on its own database and bucket, storage behind a proxy
that can be cut, and the figures each test reports for RELIABILITY.md."""

import json
import uuid

import pytest

from tests.faults.harness import Database, Stack, TcpProxy
from tests.testenv import S3_PORT

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
def storage_proxy(s3_server):
    proxy = TcpProxy(S3_PORT)
    yield proxy
    proxy.cut()


@pytest.fixture
def make_stack(request, storage_proxy, rabbit_vhost):
    """make_stack(**env) -> (stack, database); everything is stopped and dropped afterwards."""
    made = []

    def make(db_port=5432, **env):
        name = request.node.name.removeprefix("test_")[:40]
        suffix = uuid.uuid4().hex[:6]
        database = Database(f"fault_{suffix}", port=db_port)
        bucket = f"fault-{suffix}"
        stack = Stack(name, {
            **RECOVERY_ENV,
            "DATABASE_URL": database.url,
            "MINIO_ENDPOINT": f"127.0.0.1:{storage_proxy.port}",
            "MINIO_BUCKET": bucket,
            **env,
        })
        stack.bucket = bucket
        stack.storage_endpoint = f"127.0.0.1:{S3_PORT}"
        made.append((stack, database))
        database.create(stack)
        stack.purge_queues()
        return stack, database

    yield make
    for stack, database in made:
        stack.stop()
        try:
            database.drop()
        except Exception:
            pass


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
