"""Images submitted by URL (fetched by a worker through the SSRF guard and the upload checks)
and batches (one `batch.done` event once every image has ended)."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from standardwebhooks.webhooks import Webhook

from api import storage
from api.models import Batch, Image
from tests.conftest import photo, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]


class PhotoServer:
    """Serves tests/photos over HTTP on 127.0.0.1, with a few misbehaving paths."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/missing.jpg":
                    self.send_response(404)
                    self.end_headers()
                    return
                if self.path == "/to-private":
                    self.send_response(302)
                    self.send_header("location", "http://10.0.0.1/photo.jpg")
                    self.end_headers()
                    return
                body = b"this is not an image" if self.path == "/text.jpg" else photo(self.path.lstrip("/"))
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path):
        return f"http://127.0.0.1:{self.server.server_address[1]}/{path}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def photos():
    server = PhotoServer()
    yield server
    server.close()


def test_an_image_submitted_by_url_is_fetched_checked_and_processed(workers, api, photos):
    response = api.post("/api/v1/images/", {"image_url": photos.url("vlad_sample1.jpg"), "request_id": "by-url"}, format="json")
    assert response.status_code == 202, response.content
    assert response.json()["width"] is None  # not fetched yet

    image_id = response.json()["id"]
    wait_for(lambda: Image.objects.get(pk=image_id).status in ("done", "failed"), timeout=60, message="done")
    body = api.get(f"/api/v1/images/{image_id}/").json()
    assert body["status"] == "done", body["error"]
    assert (body["width"], body["height"], body["face_count"]) == (1920, 1280, 3)
    assert body["image_url"] == photos.url("vlad_sample1.jpg")
    image = Image.objects.get(pk=image_id)
    assert storage.read(image.original_key) == photo("vlad_sample1.jpg")

    again = api.post("/api/v1/images/", {"image_url": photos.url("vlad_sample1.jpg"), "request_id": "by-url"}, format="json")
    assert (again.status_code, again.json()["id"]) == (200, image_id)
    other = api.post("/api/v1/images/", {"image_url": photos.url("clm_cage.jpg"), "request_id": "by-url"}, format="json")
    assert other.status_code == 409


@pytest.mark.parametrize("path,code", [
    ("missing.jpg", "fetch_failed"),
    ("text.jpg", "invalid_image"),
    ("to-private", "fetch_blocked"),
])
def test_a_url_that_does_not_give_a_valid_image_fails_the_image(workers, api, photos, path, code):
    response = api.post("/api/v1/images/", {"image_url": photos.url(path)}, format="json")
    assert response.status_code == 202, response.content
    image_id = response.json()["id"]

    wait_for(lambda: Image.objects.get(pk=image_id).status == "failed", timeout=60, message="failure")
    image = Image.objects.get(pk=image_id)
    assert image.error_code == code
    assert image.original_key == ""


def test_a_url_on_a_blocked_address_is_refused_at_submission(api):
    response = api.post("/api/v1/images/", {"image_url": "http://169.254.169.254/latest"}, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["details"]["field"] == "image_url"


def test_a_batch_ends_with_one_batch_done_event_and_per_image_events(workers, api, integrator, photos, receiver):
    files = [SimpleUploadedFile(name, photo(name)) for name in ("clm_cage.jpg", "skimage_coffee.png")]
    response = api.post("/api/v1/batches/", {
        "images": files, "image_urls": [photos.url("clm_audrey.jpg"), photos.url("missing.jpg")],
        "callback_url": receiver.url("/batch"), "image_callback_url": receiver.url("/image"), "annotation": "blur",
    }, format="multipart")
    assert response.status_code == 202, response.content
    batch_id = response.json()["id"]
    assert response.json()["counts"]["total"] == 4  # the workers may already have begun

    wait_for(lambda: Batch.objects.get(pk=batch_id).callback_status == "delivered", timeout=90, message="batch.done")
    body = api.get(f"/api/v1/batches/{batch_id}/").json()
    assert body["status"] == "done"
    assert body["counts"] == {"total": 4, "queued": 0, "processing": 0, "done": 3, "failed": 1}
    assert all(image["annotation"] == "blur" for image in body["images"])

    [event] = receiver.received("/batch")
    payload = Webhook(integrator[0].webhook_secret).verify(event["body"], event["headers"])
    assert payload["type"] == "batch.done"
    assert payload["data"]["counts"]["done"] == 3
    wait_for(lambda: len(receiver.received("/image")) == 4, timeout=30, message="the per-image events")
    assert sorted(e["type"] for e in receiver.events("/image")) == ["image.done"] * 3 + ["image.failed"]


def test_a_batch_with_one_bad_upload_is_refused_whole(api):
    files = [SimpleUploadedFile("a.jpg", photo("clm_cage.jpg")), SimpleUploadedFile("b.jpg", b"not an image")]
    response = api.post("/api/v1/batches/", {"images": files}, format="multipart")
    assert response.status_code == 400
    assert response.json()["error"]["details"] == {"field": "images", "index": 1}
    assert Batch.objects.count() == 0 and Image.objects.count() == 0


def test_another_clients_batch_is_not_found(api, client_factory):
    from rest_framework.test import APIClient

    batch_id = api.post("/api/v1/batches/", {"images": [SimpleUploadedFile("a.jpg", photo("clm_cage.jpg"))]},
                        format="multipart").json()["id"]
    stranger = APIClient()
    stranger.credentials(HTTP_AUTHORIZATION=f"Bearer {client_factory()[1]}")
    assert stranger.get(f"/api/v1/batches/{batch_id}/").status_code == 404
    assert stranger.get("/api/v1/batches/").json()["count"] == 0
