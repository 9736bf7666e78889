"""The beat-driven recovery: images never enqueued, images stuck in processing, the attempt cap,
and callback retries coming due."""

from datetime import timedelta

import pytest
from django.utils import timezone

from api.models import Image
from tests.conftest import drain, upload
from workers import events, pipeline

pytestmark = pytest.mark.django_db(transaction=True)


def tasks_on(queue_name):
    """(task name, args, kwargs) of every message on the queue, removed from it."""
    return [(headers["task"], payload[0], payload[1]) for headers, payload in drain(queue_name)]


@pytest.fixture(autouse=True)
def _empty_queues():
    tasks_on("detect")
    tasks_on("callbacks")


def accepted_image(api, **fields):
    image = Image.objects.get(pk=upload(api).json()["id"])
    tasks_on("detect")
    Image.objects.filter(pk=image.pk).update(**fields)
    return Image.objects.get(pk=image.pk)


def test_an_image_never_enqueued_is_sent_after_the_grace_period(api, settings):
    settings.ENQUEUE_GRACE_SECONDS = 30
    stale = accepted_image(api, enqueued_at=None, created_at=timezone.now() - timedelta(seconds=31))
    fresh = accepted_image(api, enqueued_at=None)

    assert pipeline.sweep() == 1

    assert [args for _task, args, _kw in tasks_on("detect")] == [[str(stale.pk)]]
    assert Image.objects.get(pk=stale.pk).enqueued_at is not None
    assert Image.objects.get(pk=fresh.pk).enqueued_at is None


class _RefusedByTheBroker:
    def apply_async(self, *args, **kwargs):
        raise ConnectionRefusedError("the broker is down")


def test_an_upload_the_broker_refused_is_unmarked_and_sent_after_the_grace_period(api, settings, monkeypatch):
    real_build = pipeline.build
    monkeypatch.setattr(pipeline, "build", lambda *args, **kwargs: _RefusedByTheBroker())
    response = upload(api)
    assert response.status_code == 202  # the row is the record
    image = Image.objects.get(pk=response.json()["id"])
    assert image.enqueued_at is None
    assert tasks_on("detect") == []

    monkeypatch.setattr(pipeline, "build", real_build)
    settings.ENQUEUE_GRACE_SECONDS = 0
    assert pipeline.sweep() == 1
    assert [args for _task, args, _kw in tasks_on("detect")] == [[str(image.pk)]]
    assert Image.objects.get(pk=image.pk).enqueued_at is not None


def test_a_marked_image_whose_message_never_left_is_sent_after_the_deadline(api, settings):
    """The API process died between the row's commit and the publish: the row carries the mark
    it was written with, and the deadline rule sends it."""
    settings.PROCESSING_DEADLINE_SECONDS = 60
    lost = accepted_image(api, enqueued_at=timezone.now() - timedelta(seconds=61))
    recent = accepted_image(api)

    assert pipeline.sweep() == 1

    assert [args for _task, args, _kw in tasks_on("detect")] == [[str(lost.pk)]]
    assert Image.objects.get(pk=recent.pk).enqueued_at is not None


def test_an_image_stuck_in_processing_is_handed_to_another_worker(api, settings):
    settings.PROCESSING_DEADLINE_SECONDS = 60
    stuck = accepted_image(api, status="processing", task_id="gone-worker", attempts=1,
                           started_at=timezone.now() - timedelta(seconds=61))
    busy = accepted_image(api, status="processing", task_id="live-worker", attempts=1, started_at=timezone.now())

    assert pipeline.sweep() == 1

    stuck.refresh_from_db()
    assert (stuck.status, stuck.task_id) == ("queued", "")
    assert [args for _task, args, _kw in tasks_on("detect")] == [[str(stuck.pk)]]
    assert Image.objects.get(pk=busy.pk).status == "processing"


def test_an_image_that_keeps_failing_its_worker_ends_as_poison(api, settings, receiver):
    settings.PROCESSING_DEADLINE_SECONDS = 60
    settings.MAX_PIPELINE_ATTEMPTS = 3
    poison = accepted_image(api, status="processing", task_id="t", attempts=3, callback_url=receiver.url(),
                            started_at=timezone.now() - timedelta(seconds=61))

    pipeline.sweep()

    poison.refresh_from_db()
    assert (poison.status, poison.error_code) == ("failed", "poison")
    assert poison.callback_status == "pending"
    assert [(task, args) for task, args, _kw in tasks_on("callbacks")] == [("workers.tasks.send_callback", [str(poison.pk)])]


def test_a_claim_past_the_attempt_cap_fails_as_poison(api, settings):
    settings.MAX_PIPELINE_ATTEMPTS = 2
    image = accepted_image(api, status="processing", task_id="same-task", attempts=2)

    with pytest.raises(pipeline.PipelineError) as raised:
        pipeline.claim(image.pk, "same-task")  # the redelivered message of a worker that died again
    assert raised.value.code == "poison"


def test_a_claim_owned_by_another_task_is_refused(api):
    image = accepted_image(api, status="processing", task_id="other-task", attempts=1)
    assert pipeline.claim(image.pk, "my-task") is None


def test_callback_retries_are_claimed_when_due_and_only_once(api):
    due = accepted_image(api, status="done", callback_url="http://127.0.0.1:9/h", callback_status="pending",
                         callback_attempts=2, callback_event_id="msg_a", callback_next_attempt_at=timezone.now())
    accepted_image(api, status="done", callback_url="http://127.0.0.1:9/h", callback_status="pending",
                   callback_attempts=1, callback_event_id="msg_b",
                   callback_next_attempt_at=timezone.now() + timedelta(minutes=5))

    claimed, _ = events.claim(10, 10)
    assert [(attempt.pk, attempt.number, attempt.event_id) for attempt in claimed] == [(due.pk, 3, "msg_a")]
    assert events.claim(10, 10)[0] == []  # leased: the next look leaves it alone


def test_a_retry_after_a_transient_error_does_not_use_up_an_attempt(api, settings):
    settings.MAX_PIPELINE_ATTEMPTS = 2
    image = accepted_image(api, status="processing", task_id="retrying-task", attempts=2)

    for _ in range(5):  # a storage outage waited out with five retries
        assert pipeline.claim(image.pk, "retrying-task", new_attempt=False) is not None
    assert Image.objects.get(pk=image.pk).attempts == 2


FACE = {"box": {"x": 1, "y": 2, "width": 30, "height": 40}, "confidence": 0.99,
        "keypoints": {"left_eye": [10, 12], "right_eye": [20, 12], "nose": [15, 20], "mouth_left": [11, 30], "mouth_right": [19, 30]}}


def test_a_worker_that_lost_its_claim_saves_no_faces_and_does_not_finish(api):
    image = accepted_image(api, status="processing", task_id="new-owner", attempts=2)

    assert not pipeline.finish(image, "old-owner", [FACE], 100, "annotated/x.jpg")

    image.refresh_from_db()
    assert (image.status, image.face_count, image.annotated_key, image.faces.count()) == ("processing", None, "", 0)


def test_finishing_twice_under_the_same_claim_is_refused_and_leaves_one_set_of_faces(api):
    image = accepted_image(api, status="processing", task_id="owner", attempts=1)

    assert pipeline.finish(image, "owner", [FACE, FACE], 100, "annotated/x.jpg")
    assert not pipeline.finish(image, "owner", [FACE], 100, "annotated/x.jpg")  # redelivered after the commit

    image.refresh_from_db()
    assert (image.status, image.face_count, image.faces.count()) == ("done", 2, 2)
    assert image.task_id == ""
