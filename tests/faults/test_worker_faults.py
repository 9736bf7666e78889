"""Workers dying or stopping mid-batch lose nothing: late acks, re-queued messages, and claims
a redelivered message can take back."""

import os
import signal

import pytest

from tests.conftest import wait_for
from tests.faults.harness import assert_nothing_lost

pytestmark = pytest.mark.faults


def processing(db, ids):
    return db.query("select count(*) from api_image where id = any(%s) and status = 'processing'", (list(ids),))[0][0]


def finished(db, ids):
    return db.query("select count(*) from api_image where id = any(%s) and status in ('done', 'failed')", (list(ids),))[0][0]


def test_a_pool_process_killed_with_sigkill_mid_detection(make_stack, receiver, report):
    stack, db = make_stack()
    stack.start_all()
    accepted = stack.submit_batch(stack.create_client(), receiver, count=24)

    wait_for(lambda: processing(db, accepted), timeout=60, interval=0.05, message="an image in detection")
    # Every pool process, so the one holding the image in detection is surely among them.
    for victim in stack.pool_children("worker"):
        os.kill(victim, signal.SIGKILL)

    figures = assert_nothing_lost(db, accepted, receiver, stack.s3, stack.bucket)
    assert "WorkerLostError" in stack.log("worker")
    report(fault="SIGKILL of the pool processes mid-detection", **figures)


def test_the_whole_worker_killed_with_sigkill(make_stack, receiver, report):
    stack, db = make_stack()
    stack.start_all()
    accepted = stack.submit_batch(stack.create_client(), receiver, count=24)

    wait_for(lambda: finished(db, accepted) >= 3 and processing(db, accepted), timeout=90, interval=0.05,
             message="the batch under way")
    stack.kill("worker", signal.SIGKILL)
    assert finished(db, accepted) < len(accepted)
    stack.start_detect("detect-replacement")

    figures = assert_nothing_lost(db, accepted, receiver, stack.s3, stack.bucket)
    report(fault="SIGKILL of the whole worker (main process and pool), then a new worker", **figures)


def test_a_worker_stopped_with_sigterm_finishes_its_images_and_leaves_the_rest_queued(make_stack, receiver, report):
    stack, db = make_stack()
    stack.start_all()
    accepted = stack.submit_batch(stack.create_client(), receiver, count=24)

    wait_for(lambda: finished(db, accepted) >= 2 and processing(db, accepted), timeout=90, interval=0.05,
             message="the batch under way")
    stack.kill("worker", signal.SIGTERM, wait=60)  # warm shutdown: the tasks in hand are finished
    assert "warm shutdown" in stack.log("worker").lower()
    assert stack.procs["worker"].returncode == 0
    # Images between two steps of their chain stay `processing`: their next message waits in the queue.
    stopped_with = finished(db, accepted)
    stack.start_detect("detect-replacement")

    figures = assert_nothing_lost(db, accepted, receiver, stack.s3, stack.bucket)
    report(fault=f"SIGTERM (warm shutdown) with {stopped_with} of {len(accepted)} finished, then a new worker", **figures)
