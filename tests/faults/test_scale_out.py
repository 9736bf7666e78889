"""Scale-out: two detection workers as if on two machines (separate processes, their own node
names, one broker) both take work, and when one dies the other finishes everything."""

import json
import signal

import pytest

from tests.conftest import wait_for
from tests.faults.harness import assert_nothing_lost

pytestmark = pytest.mark.faults


def images_done_by(stack, worker):
    lines = [json.loads(line) for line in stack.log(worker).splitlines() if line.startswith("{")]
    return {line["image_id"] for line in lines if "faces in" in line.get("message", "")}


def test_two_workers_share_the_queue_and_one_finishes_when_the_other_dies(make_stack, receiver, report):
    stack, db = make_stack()
    stack.start_api()
    stack.start_detect("machine-a", concurrency=1)
    stack.start_detect("machine-b", concurrency=1)
    stack.start_callbacks()
    stack.start_beat()
    accepted = stack.submit_batch(stack.create_client(), receiver, count=30)

    wait_for(lambda: images_done_by(stack, "machine-a") and images_done_by(stack, "machine-b"), timeout=90,
             interval=0.1, message="both workers to take work")
    stack.kill("machine-a", signal.SIGKILL)
    by_a = images_done_by(stack, "machine-a")

    figures = assert_nothing_lost(db, accepted, receiver, stack.s3, stack.bucket)
    by_b = images_done_by(stack, "machine-b")
    assert by_a and by_b
    assert set(accepted) <= by_a | by_b
    report(fault=f"two workers (a: {len(by_a)} images, b: {len(by_b)}); a killed with SIGKILL mid-batch", **figures)
