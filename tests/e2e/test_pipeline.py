"""The whole pipeline on real workers: upload -> detect -> faces -> annotated image -> signed callback."""

import csv
import io
import uuid
from pathlib import Path

import PIL.Image
import pytest
from standardwebhooks.webhooks import Webhook

from api import storage
from api.models import CallbackAttempt, Face, Image
from tests.conftest import PHOTOS, photo, upload, wait_for
from workers import pipeline

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]

# MTCNN misses two of the three faces in vlad_sample2 (one in profile, one looking down): FACTS.md
# measured it at full resolution, and at 1024 px it finds at most one of the two. BlazeFace finds
# every face a person counts here (bench.quality).
KNOWN_MISSES = {"mtcnn": {"vlad_sample2.jpg": 2}, "blazeface": {}}
KEYPOINTS = {
    "mtcnn": {"left_eye", "right_eye", "nose", "mouth_left", "mouth_right"},
    "blazeface": {"left_eye", "right_eye", "nose", "mouth", "left_ear", "right_ear"},
}


def expected_faces():
    with open(PHOTOS / "faces.tsv") as tsv:
        return {row["file"]: int(row["faces_seen_by_eye"]) for row in csv.DictReader(tsv, delimiter="\t")}


def finished(image_ids):
    images = Image.objects.filter(pk__in=image_ids, status__in=["done", "failed"])
    return images.count() == len(image_ids)


def verify(event_request, webhook_secret):
    """Check the signature with the Standard Webhooks reference library, not our own code."""
    return Webhook(webhook_secret).verify(event_request["body"], event_request["headers"])


@pytest.mark.parametrize("engine", ["mtcnn", "blazeface"])
def test_every_photo_ends_done_with_the_faces_a_person_counts(workers, api, integrator, receiver, engine):
    from workers.detection import DEFAULT_MIN_CONFIDENCE

    expected = expected_faces()
    ids = {}
    for name in expected:
        response = upload(api, name, request_id=name, callback_url=receiver.url(f"/{name}"), engine=engine)
        assert response.status_code == 202, response.content
        ids[name] = response.json()["id"]

    wait_for(lambda: finished(list(ids.values())), timeout=240, message="every photo to finish")
    wait_for(lambda: len(receiver.received()) >= len(ids), timeout=30, message="every callback")

    for name, image_id in ids.items():
        body = api.get(f"/api/v1/images/{image_id}/").json()
        assert body["status"] == "done", (name, body["error"])
        found, seen = body["face_count"], expected[name]
        assert body["engine"] == engine
        assert seen - KNOWN_MISSES[engine].get(name, 0) <= found <= seen, (name, found, seen)
        assert len(body["faces"]) == found == Face.objects.filter(image_id=image_id).count()
        for face in body["faces"]:
            box = face["box"]
            assert 0 <= box["x"] and box["x"] + box["width"] <= body["width"]
            assert 0 <= box["y"] and box["y"] + box["height"] <= body["height"]
            assert face["confidence"] >= DEFAULT_MIN_CONFIDENCE[engine]
            assert set(face["keypoints"]) == KEYPOINTS[engine]
            assert set(face["pose"]) == {"yaw", "pitch", "roll"} and 0 < face["quality"]["ipd"] < box["width"]
        assert body["timings_ms"]["detect"] > 0 and body["timings_ms"]["total"] >= body["timings_ms"]["detect"]

        annotated = api.get(body["annotated_url"].removeprefix("http://testserver"))
        assert annotated.status_code == 200
        output = PIL.Image.open(io.BytesIO(annotated.content))
        assert output.size == (body["width"], body["height"])
        assert output.format == ("PNG" if name.endswith(".png") else "JPEG")
        assert annotated["Content-Type"] == PIL.Image.MIME[output.format]
        assert not output.getexif()

        events = receiver.received(f"/{name}")
        assert len(events) == 1, name
        payload = verify(events[0], integrator[0].webhook_secret)
        assert payload["type"] == "image.done"
        assert payload["data"]["id"] == image_id
        assert payload["data"]["face_count"] == found
        assert [(face["pose"], face["quality"]) for face in payload["data"]["faces"]] == [
            (face["pose"], face["quality"]) for face in body["faces"]]
        assert payload["data"]["callback"]["attempts"] == 1


def test_a_blazeface_worker_never_loads_tensorflow(workers, api):
    """A worker loads only the engines of its queues: the BlazeFace pool stays small and starts fast."""
    image_id = upload(api, "clm_cage.jpg", engine="blazeface").json()["id"]
    wait_for(lambda: finished([image_id]), timeout=60, message="the BlazeFace image")
    children = workers.pool_children("worker-blazeface")
    assert children
    for pid in [workers.procs["worker-blazeface"].pid, *children]:
        assert "tensorflow" not in Path(f"/proc/{pid}/maps").read_text(), pid


def test_a_failing_receiver_is_retried_with_the_same_webhook_id(workers, api, integrator, receiver):
    receiver.script["/flaky"] = [500, 500, 200]

    image_id = upload(api, callback_url=receiver.url("/flaky")).json()["id"]

    wait_for(lambda: Image.objects.get(pk=image_id).callback_status == "delivered", timeout=60, message="delivery")
    attempts = receiver.received("/flaky")
    assert len(attempts) == 3
    assert len({a["headers"]["webhook-id"] for a in attempts}) == 1
    for attempt in attempts:
        verify(attempt, integrator[0].webhook_secret)
    assert [e["data"]["callback"]["attempts"] for e in receiver.events("/flaky")] == [1, 2, 3]
    assert list(CallbackAttempt.objects.filter(image_id=image_id).values_list("number", "status_code")) == [
        (1, 500), (2, 500), (3, 200),
    ]
    resource = api.get(f"/api/v1/images/{image_id}/").json()["callback"]
    assert resource == {"url": receiver.url("/flaky"), "status": "delivered", "attempts": 3, "last_status_code": 200}


def test_a_receiver_that_never_succeeds_gets_every_retry_then_failed(workers, api, receiver):
    receiver.script["/down"] = [503] * 10

    image_id = upload(api, callback_url=receiver.url("/down")).json()["id"]

    wait_for(lambda: Image.objects.get(pk=image_id).callback_status == "failed", timeout=60, message="giving up")
    # One attempt, then one after each delay of CALLBACK_RETRY_DELAYS ("1,1" in the tests).
    assert len(receiver.received("/down")) == 3


def test_410_stops_delivery(workers, api, receiver):
    receiver.script["/gone"] = [410]

    image_id = upload(api, callback_url=receiver.url("/gone")).json()["id"]

    wait_for(lambda: Image.objects.get(pk=image_id).callback_status == "failed", timeout=60, message="410 handled")
    wait_for(lambda: Image.objects.get(pk=image_id).callback_next_attempt_at is None, timeout=5)
    assert len(receiver.received("/gone")) == 1


def test_a_receiver_on_a_blocked_address_is_never_contacted(workers, api):
    from tests.receiver import Receiver

    blocked = Receiver(host="127.0.0.2")  # loopback, outside CALLBACK_ALLOWED_NETWORKS (127.0.0.1/32)
    try:
        response = upload(api, callback_url=blocked.url())
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_callback_url"
        assert blocked.received() == []
    finally:
        blocked.close()


def _accepted_without_upload(client, key, data=None):
    """An image row whose stored object is missing (data None) or holds these bytes."""
    image_id = uuid.uuid4()
    if data is not None:
        storage.put(key, data)
    return Image.objects.create(
        id=image_id, client=client, original_key=key, sha256="0" * 64, size_bytes=1, format="JPEG",
        width=500, height=614, callback_url="",
    )


def test_an_image_whose_original_is_gone_fails_with_a_failed_callback(workers, api, integrator, receiver):
    image = _accepted_without_upload(integrator[0], f"originals/{uuid.uuid4()}.jpg")
    Image.objects.filter(pk=image.pk).update(callback_url=receiver.url("/missing"))

    pipeline.enqueue(image.pk)

    wait_for(lambda: Image.objects.get(pk=image.pk).status == "failed", timeout=60, message="failure")
    body = api.get(f"/api/v1/images/{image.pk}/").json()
    assert body["error"] == {"code": "image_missing", "message": "The stored original is gone."}
    assert body["faces"] is None and body["annotated_url"] is None
    wait_for(lambda: receiver.received("/missing"), timeout=30, message="the failure callback")
    [event] = receiver.events("/missing")
    assert event["type"] == "image.failed"
    assert event["data"]["error"]["code"] == "image_missing"


def test_an_image_whose_original_is_unreadable_fails(workers, api, integrator):
    image = _accepted_without_upload(integrator[0], f"originals/{uuid.uuid4()}.jpg", data=b"not an image at all")

    pipeline.enqueue(image.pk)

    wait_for(lambda: Image.objects.get(pk=image.pk).status == "failed", timeout=60, message="failure")
    assert Image.objects.get(pk=image.pk).error_code == "undecodable_image"


def test_a_redelivered_chain_leaves_no_duplicate_faces(workers, api):
    image_id = upload(api, "vlad_sample1.jpg").json()["id"]
    wait_for(lambda: Image.objects.get(pk=image_id).status == "done", timeout=60, message="done")
    faces = list(Face.objects.filter(image_id=image_id).values_list("index", "x", "y"))

    # An operator re-runs it: the same fixed keys are overwritten, the faces replaced.
    assert pipeline.rerun(image_id)
    wait_for(lambda: Image.objects.get(pk=image_id).status == "done", timeout=60, message="done again")

    assert list(Face.objects.filter(image_id=image_id).values_list("index", "x", "y")) == faces
    assert Image.objects.get(pk=image_id).annotated_key == f"annotated/{image_id}.jpg"


def test_blur_masks_the_faces(workers, api):
    image_id = upload(api, "clm_cage.jpg", annotation="blur").json()["id"]
    wait_for(lambda: Image.objects.get(pk=image_id).status == "done", timeout=60, message="done")

    body = api.get(f"/api/v1/images/{image_id}/").json()
    blurred = PIL.Image.open(io.BytesIO(api.get(f"/api/v1/images/{image_id}/annotated").content)).convert("L")
    original = PIL.Image.open(io.BytesIO(photo("clm_cage.jpg"))).convert("L")
    box = body["faces"][0]["box"]
    region = (box["x"], box["y"], box["x"] + box["width"], box["y"] + box["height"])
    # Blurring removes detail: far fewer sharp edges inside the face than before.
    from PIL import ImageFilter, ImageStat

    def edges(img):
        return ImageStat.Stat(img.crop(region).filter(ImageFilter.FIND_EDGES)).mean[0]

    assert edges(blurred) < edges(original) / 3


def test_logs_are_json_lines_carrying_the_image_and_request_ids(workers, api):
    import json

    response = upload(api, "clm_audrey.jpg", request_id="traced-1")
    image_id = response.json()["id"]
    wait_for(lambda: Image.objects.get(pk=image_id).status == "done", timeout=60, message="done")

    def lines_about_the_image():
        lines = [json.loads(line) for line in workers.detect_log().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("image_id") == image_id]

    lines = wait_for(lines_about_the_image, timeout=10, message="log lines naming the image")
    assert any("faces in" in line["message"] for line in lines)
    assert {"time", "level", "logger", "message"} <= set(lines[0])
