"""Accepting an upload: 202, the original in S3, the row committed, the chain in RabbitMQ."""

import hashlib
import json

import pytest

from api import storage
from api.models import Image
from tests.conftest import drain, photo, upload, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def _drain_detect_queue():
    return drain("detect")


@pytest.fixture(autouse=True)
def _empty_queue():
    _drain_detect_queue()
    drain("detect-blazeface")


def test_it_accepts_an_upload_stores_it_and_enqueues_after_commit(api, integrator):
    response = upload(api, "vlad_sample1.jpg", request_id="order-1", callback_url="http://127.0.0.1:9/hook")

    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued"
    assert body["request_id"] == "order-1"
    assert (body["width"], body["height"]) == (1920, 1280)
    for field in ("face_count", "faces", "annotated_url", "finished_at"):
        assert body[field] is None
    assert response["Location"] == f"http://testserver/api/v1/images/{body['id']}/"
    assert body["original_url"] == f"http://testserver/api/v1/images/{body['id']}/original"
    assert body["callback"] == {"url": "http://127.0.0.1:9/hook", "status": "none", "attempts": 0, "last_status_code": None}

    image = Image.objects.get(pk=body["id"])
    assert image.client == integrator[0]
    assert image.format == "JPEG"
    assert image.sha256 == hashlib.sha256(photo("vlad_sample1.jpg")).hexdigest()
    assert image.enqueued_at is not None
    assert storage.read(image.original_key) == photo("vlad_sample1.jpg")

    messages = wait_for(_drain_detect_queue, timeout=10, message="the detect message")
    assert len(messages) == 1
    headers, payload = messages[0]
    assert headers["task"] == "workers.tasks.detect_faces"
    args, kwargs, embed = payload
    assert args == [str(image.pk)]
    # The next step and the errback ride along with the first message, ids only.
    assert [task["task"] for task in embed["callbacks"]] == ["workers.tasks.send_callback"]
    assert [(task["task"], task["kwargs"]) for task in embed["errbacks"]] == [
        ("workers.tasks.on_pipeline_error", {"image_id": str(image.pk)})]
    json.dumps(payload)  # JSON over the wire, nothing pickled


def test_it_reads_the_real_type_from_the_bytes_not_the_name(api):
    response = upload(api, "skimage_astronaut.png")  # PNG bytes, sent as application/octet-stream

    assert response.status_code == 202
    assert Image.objects.get(pk=response.json()["id"]).format == "PNG"


def test_the_same_request_id_and_bytes_return_the_existing_image_without_a_new_job(api):
    first = upload(api, request_id="same")
    _drain_detect_queue()

    again = upload(api, request_id="same")

    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert Image.objects.count() == 1
    assert _drain_detect_queue() == []


def test_a_concurrent_duplicate_that_loses_the_insert_returns_the_winner_and_leaves_nothing(api, monkeypatch):
    from workers import pipeline

    first = upload(api, request_id="raced")
    _drain_detect_queue()
    # The other request checked for the request_id before the first one committed.
    real_existing, stored = pipeline._existing, []
    lookups = iter([lambda *args, **kwargs: None])
    monkeypatch.setattr(pipeline, "_existing", lambda *a, **kw: next(lookups, real_existing)(*a, **kw))
    real_store = pipeline._store
    monkeypatch.setattr(pipeline, "_store", lambda *a: stored.append(real_store(*a)) or stored[-1])

    again = upload(api, request_id="raced")

    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert Image.objects.count() == 1
    assert not storage.exists(stored[0][1]["original_key"])  # the loser's object is removed
    assert _drain_detect_queue() == []


def test_the_same_request_id_with_other_bytes_is_a_conflict(api):
    upload(api, "clm_cage.jpg", request_id="same")

    response = upload(api, "clm_audrey.jpg", request_id="same")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict"
    assert Image.objects.count() == 1


def test_request_ids_are_scoped_to_their_client(api, client_factory):
    from rest_framework.test import APIClient

    other = APIClient()
    other.credentials(HTTP_AUTHORIZATION=f"Bearer {client_factory()[1]}")

    assert upload(api, "clm_cage.jpg", request_id="shared").status_code == 202
    assert upload(other, "clm_audrey.jpg", request_id="shared").status_code == 202


def test_options_are_stored(api):
    response = upload(api, min_face_size="40", min_confidence="0.95", annotation="blur")

    image = Image.objects.get(pk=response.json()["id"])
    assert (image.min_face_size, image.min_confidence, image.annotation) == (40, 0.95, "blur")


def test_the_kept_serializer_gives_what_a_fresh_one_gives_for_every_state(api, settings):
    from django.test import RequestFactory
    from rest_framework.request import Request

    from api.models import Face
    from api.serializers import ImageSerializer

    queued, done, failed = (Image.objects.get(pk=upload(api, request_id=f"r{n}").json()["id"]) for n in range(3))
    Image.objects.filter(pk=done.pk).update(status="done", face_count=1, annotated_key=f"annotated/{done.pk}.jpg")
    Face.objects.create(image=done, index=0, x=1, y=2, width=30, height=40, confidence=0.99, keypoints={
        name: [5, 6] for name in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")})
    Image.objects.filter(pk=failed.pk).update(status="failed", error_code="poison", error_message="gave up")

    settings.ALLOWED_HOSTS = ["one.example", "two.example"]
    for host in ("one.example", "two.example"):  # the context (the request) changes between calls
        context = {"request": Request(RequestFactory().get("/", HTTP_HOST=host))}
        for image in Image.objects.prefetch_related("faces").order_by("request_id"):
            kept = ImageSerializer.represent(image, context)
            assert json.dumps(kept, default=str) == json.dumps(ImageSerializer(image, context=context).data, default=str)
            assert host in kept["original_url"]


def test_each_engine_goes_to_its_own_queue_with_its_own_default_confidence(api):
    from workers.detection import DEFAULT_MIN_CONFIDENCE

    mtcnn = upload(api, "clm_cage.jpg").json()
    blazeface = upload(api, "clm_audrey.jpg", engine="blazeface").json()

    assert (mtcnn["engine"], mtcnn["min_confidence"]) == ("mtcnn", DEFAULT_MIN_CONFIDENCE["mtcnn"])
    assert (blazeface["engine"], blazeface["min_confidence"]) == ("blazeface", DEFAULT_MIN_CONFIDENCE["blazeface"])
    assert Image.objects.get(pk=blazeface["id"]).engine == "blazeface"
    # Each pool consumes only its own queue: a BlazeFace worker never sees an MTCNN image.
    assert [payload[0] for _, payload in wait_for(_drain_detect_queue, timeout=10)] == [[mtcnn["id"]]]
    assert [payload[0] for _, payload in wait_for(lambda: drain("detect-blazeface"), timeout=10)] == [[blazeface["id"]]]


def test_a_given_confidence_wins_over_the_engines_default(api):
    body = upload(api, engine="blazeface", min_confidence="0.97").json()
    assert (body["engine"], body["min_confidence"]) == ("blazeface", 0.97)


def test_an_unknown_engine_is_refused_and_nothing_is_stored(api):
    response = upload(api, engine="haar")

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "engine" in error["details"]["fields"]
    assert Image.objects.count() == 0
    assert _drain_detect_queue() == []


def test_a_batch_sends_every_image_to_its_engines_queue(api):
    from django.core.files.uploadedfile import SimpleUploadedFile

    response = api.post("/api/v1/batches/", {
        "images": [SimpleUploadedFile(name, photo(name)) for name in ("clm_cage.jpg", "clm_audrey.jpg")],
        "engine": "blazeface",
    }, format="multipart")

    assert response.status_code == 202
    assert {image["engine"] for image in response.json()["images"]} == {"blazeface"}
    messages = wait_for(lambda: drain("detect-blazeface"), timeout=10)
    assert len(messages) == 2
