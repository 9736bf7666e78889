"""Servers going down and coming back: RabbitMQ, Redis, the S3 storage and PostgreSQL. Each test
that stops a server runs its own private instance of it, so a failure never leaves the
machine's services down."""

import time

import pytest
import requests

from tests.conftest import PHOTOS, wait_for
from stack import S3Server
from tests.faults.harness import PrivatePostgres, PrivateRabbit, PrivateRedis, assert_nothing_lost

pytestmark = pytest.mark.faults


def finished(db, ids):
    return db.query("select count(*) from api_image where id = any(%s) and status in ('done', 'failed')", (list(ids),))[0][0]


@pytest.fixture
def rabbit():
    node = PrivateRabbit()
    node.start()
    yield node
    node.cleanup()


def test_rabbitmq_restarted_with_jobs_queued_running_and_arriving(make_stack, receiver, report, rabbit):
    stack, db = make_stack(CELERY_BROKER_URL=rabbit.url)
    stack.start_all()
    credentials = stack.create_client()
    accepted = stack.submit_batch(credentials, receiver, count=20, prefix="before")
    wait_for(lambda: finished(db, accepted) >= 2, timeout=90, interval=0.1, message="the batch under way")

    rabbit.stop()
    # Uploads while the broker is down are still accepted: the row is the record.
    during = stack.submit_batch(credentials, receiver, count=20, prefix="during")
    unsent = db.query("select count(*) from api_image where id = any(%s) and enqueued_at is null", (list(during),))[0][0]
    assert unsent == len(during)
    time.sleep(2)
    rabbit.start()

    figures = assert_nothing_lost(db, {**accepted, **during}, receiver, stack.s3, stack.bucket, timeout=240)
    report(fault="RabbitMQ stopped and restarted mid-batch; 20 uploads accepted while it was down", **figures)


def test_rabbitmq_restarted_while_a_callback_is_being_delivered(make_stack, receiver, report, rabbit):
    """The callbacks worker loses the broker with a delivery in progress, so it comes back with a
    task still running; it must go on consuming afterwards (Celery's prefetch-count reduction
    after a reconnect once stalled it here, every later callback left pending)."""
    stack, db = make_stack(CELERY_BROKER_URL=rabbit.url)
    stack.start_all()
    credentials = stack.create_client()
    # First attempts slower than the tests' CALLBACK_TIMEOUT (3 s): they end while the broker is
    # away, so their acknowledgements fail after the reconnect (how the stall began); retries pass.
    slow = [f"/slow-{index}" for index in range(3)]
    receiver.delays.update({path: [4] for path in slow})
    accepted = stack.submit_batch(credentials, receiver, count=len(slow), prefix="slow")
    wait_for(lambda: all(receiver.received(path) for path in slow), timeout=90, interval=0.05,
             message="the slow callbacks under way")

    rabbit.stop()
    time.sleep(1)
    rabbit.start()
    accepted |= stack.submit_batch(credentials, receiver, count=10, prefix="after")

    figures = assert_nothing_lost(db, accepted, receiver, stack.s3, stack.bucket, timeout=240)
    report(fault="RabbitMQ restarted while the callbacks worker was delivering a callback", **figures)


def test_redis_down_for_a_while_changes_nothing(make_stack, receiver, report):
    redis = PrivateRedis()
    redis.start()
    try:
        stack, db = make_stack(REDIS_URL=redis.url, CELERY_RESULT_BACKEND=redis.url)
        stack.start_all()
        credentials = stack.create_client()
        accepted = stack.submit_batch(credentials, receiver, count=10, prefix="before")
        redis.stop()
        accepted |= stack.submit_batch(credentials, receiver, count=10, prefix="during")  # rate limit fails open
        time.sleep(2)
        redis.start()
        figures = assert_nothing_lost(db, accepted, receiver, stack.s3, stack.bucket)
        report(fault="Redis (result backend, rate-limit cache) stopped mid-batch, restarted", **figures)
    finally:
        redis.stop()


@pytest.fixture
def private_s3(tmp_path):
    server = S3Server(tmp_path / "s3").start()
    yield server
    server.stop()


def test_storage_down_refuses_uploads_and_workers_wait_it_out(make_stack, receiver, report, private_s3):
    stack, db = make_stack(s3=private_s3)
    stack.start_all()
    credentials = stack.create_client()
    accepted = stack.submit_batch(credentials, receiver, count=20)
    wait_for(lambda: finished(db, accepted) >= 1, timeout=90, interval=0.1, message="the batch under way")

    private_s3.kill()  # SIGKILL: the storage server crashes mid-batch
    with open(PHOTOS / "clm_cage.jpg", "rb") as f:
        refused = requests.post(f"{stack.base_url}/api/v1/images/", files={"image": f}, data={"request_id": "refused"},
                                headers={"Authorization": f"Bearer {credentials['api_key']}"}, timeout=60)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "service_unavailable"
    assert db.query("select count(*) from api_image where request_id = 'refused'")[0][0] == 0
    time.sleep(4)
    private_s3.start()  # same ports, same data

    figures = assert_nothing_lost(db, accepted, receiver, stack.s3, stack.bucket, timeout=240)
    assert "Retry in" in stack.detect_log()  # the workers met the outage and waited it out
    report(fault="S3 server killed (SIGKILL) mid-batch, restarted 4 s later (uploads refused with 503, nothing written)",
           **figures)


def test_postgresql_restarted_under_load(make_stack, receiver, report):
    postgres = PrivatePostgres()
    postgres.init()
    postgres.start()
    try:
        stack, db = make_stack(db_port=postgres.port)
        stack.start_all()
        credentials = stack.create_client()
        accepted = stack.submit_batch(credentials, receiver, count=20)
        wait_for(lambda: finished(db, accepted) >= 2, timeout=90, interval=0.1, message="the batch under way")

        postgres.stop("fast")
        health = requests.get(f"{stack.base_url}/api/v1/health/", timeout=30)
        assert health.status_code == 503 and health.json()["checks"]["database"] != "ok"
        time.sleep(2)
        postgres.start()
        # Every API process held a connection the restart ended: each notices before its next
        # query and reconnects, so the first uploads after the restart are accepted (202), not 500.
        accepted.update(stack.submit_batch(credentials, receiver, count=8, prefix="after-restart"))

        figures = assert_nothing_lost(db, accepted, receiver, stack.s3, stack.bucket, timeout=240)
        assert "Retry in" in stack.detect_log()
        report(fault="PostgreSQL stopped (fast) and restarted mid-batch; 8 uploads right after the restart", **figures)
    finally:
        postgres.cleanup()
