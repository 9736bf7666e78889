"""Every error row of the SPEC that the API answers: the right status, the uniform JSON body,
and nothing stored or enqueued."""

import io
import struct
import time
import zlib

import PIL.Image
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from api.models import Image
from tests.conftest import photo, upload

pytestmark = pytest.mark.django_db(transaction=True)


def assert_error(response, status, code):
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)
    return body["error"]


def stored_objects(s3_server):
    from django.conf import settings

    if not s3_server.client().bucket_exists(settings.MINIO_BUCKET):
        return set()
    return s3_server.objects(settings.MINIO_BUCKET)


@pytest.fixture
def nothing_stored(s3_server):
    """Asserts after the test that no image row and no stored object were left behind."""
    before = stored_objects(s3_server)
    yield
    assert Image.objects.count() == 0
    assert stored_objects(s3_server) == before


def png_declaring(width, height):
    """A tiny PNG whose header claims width x height: a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def encoded(size, fmt="PNG", **save):
    buffer = io.BytesIO()
    PIL.Image.new("RGB", size, (120, 80, 40)).save(buffer, fmt, **save)
    return buffer.getvalue()


# --- Authentication and isolation ------------------------------------------------------------


def test_it_refuses_a_request_without_a_key():
    assert_error(APIClient().get("/api/v1/images/"), 401, "not_authenticated")


@pytest.mark.parametrize("header", ["Bearer fd_wrong", "Bearer", "Bearer a b", "Basic Zm9vOmJhcg==", "Bearer \u00e9"])
def test_it_refuses_a_bad_key(db, header):
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=header)
    assert_error(api.get("/api/v1/images/"), 401, "not_authenticated")


def _revoke(integrator):
    client, _ = integrator
    client.is_active = False
    client.save()


def test_it_refuses_a_revoked_client(api, integrator):
    _revoke(integrator)
    assert_error(api.get("/api/v1/images/"), 401, "not_authenticated")


def test_a_revoked_client_is_refused_once_its_remembered_key_expires(api, integrator, settings):
    settings.AUTH_CACHE_SECONDS = 1
    assert api.get("/api/v1/images/").status_code == 200
    _revoke(integrator)

    assert api.get("/api/v1/images/").status_code == 200  # remembered by this process
    time.sleep(1.1)
    assert_error(api.get("/api/v1/images/"), 401, "not_authenticated")


def test_with_no_auth_cache_a_revoked_client_is_refused_at_once(api, integrator, settings):
    settings.AUTH_CACHE_SECONDS = 0
    assert api.get("/api/v1/images/").status_code == 200
    _revoke(integrator)
    assert_error(api.get("/api/v1/images/"), 401, "not_authenticated")


def test_another_clients_image_is_not_found_on_every_endpoint(api, client_factory):
    image_id = upload(api, request_id="mine").json()["id"]
    stranger = APIClient()
    stranger.credentials(HTTP_AUTHORIZATION=f"Bearer {client_factory()[1]}")

    for path in ("", "original", "annotated"):
        assert_error(stranger.get(f"/api/v1/images/{image_id}/{path}"), 404, "not_found")
    assert stranger.get("/api/v1/images/").json()["count"] == 0
    assert stranger.get("/api/v1/images/?request_id=mine&status=queued").json()["count"] == 0


def test_an_unknown_or_malformed_id_is_not_found(api):
    assert_error(api.get("/api/v1/images/00000000-0000-0000-0000-000000000000/"), 404, "not_found")
    assert_error(api.get("/api/v1/images/not-a-uuid/"), 404, "not_found")


def test_the_annotated_image_is_not_ready_before_done(api):
    image_id = upload(api).json()["id"]
    assert_error(api.get(f"/api/v1/images/{image_id}/annotated"), 409, "not_ready")


# --- Hostile and malformed uploads -----------------------------------------------------------


def test_it_rejects_a_decompression_bomb(api, nothing_stored):
    assert_error(upload(api, data=png_declaring(30000, 30000)), 413, "image_too_large")


def test_it_rejects_an_image_over_the_pixel_limit(api, settings, nothing_stored):
    settings.MAX_IMAGE_PIXELS = 100 * 100
    assert_error(upload(api, data=encoded((101, 100))), 413, "image_too_large")


def test_it_rejects_an_image_over_the_byte_limit(api, settings, nothing_stored):
    settings.MAX_UPLOAD_BYTES = 1000
    assert_error(upload(api, "clm_cage.jpg"), 413, "image_too_large")


def test_it_rejects_a_truncated_jpeg(api, nothing_stored):
    data = photo("clm_cage.jpg")
    assert_error(upload(api, data=data[: len(data) // 2]), 400, "invalid_image")


@pytest.mark.parametrize(
    "data",
    [b"hello, I am a text file\n", b"", b"\xff\xd8\xff\xe0garbage", b"GIF89a" + b"\x00" * 100],
    ids=["text", "empty", "jpeg-magic-garbage", "gif-magic"],
)
def test_it_rejects_bytes_that_are_not_a_supported_image(api, data, nothing_stored):
    assert_error(upload(api, "photo.jpg", data=data), 400, "invalid_image")


def test_it_rejects_an_unsupported_real_image_type(api, nothing_stored):
    assert_error(upload(api, "x.jpg", data=encoded((64, 64), "GIF")), 400, "invalid_image")


def test_it_rejects_an_animated_image(api, nothing_stored):
    frames = [PIL.Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:])
    assert_error(upload(api, data=buffer.getvalue()), 400, "invalid_image")


def test_it_rejects_a_one_pixel_image(api, nothing_stored):
    assert_error(upload(api, data=encoded((1, 1))), 400, "invalid_image")


def test_it_requires_the_image_field(api, nothing_stored):
    error = assert_error(api.post("/api/v1/images/", {"request_id": "x"}, format="multipart"), 400, "invalid_request")
    assert "image" in error["details"]["fields"]


def test_it_rejects_two_image_parts(api, nothing_stored):
    files = [SimpleUploadedFile(f"{n}.jpg", photo("clm_cage.jpg")) for n in "ab"]
    assert_error(api.post("/api/v1/images/", {"image": files}, format="multipart"), 400, "invalid_request")


def test_it_rejects_a_body_that_is_not_multipart(api, nothing_stored):
    response = api.post("/api/v1/images/", b"\x00\x01", content_type="application/octet-stream")
    assert_error(response, 400, "invalid_request")


def test_it_rejects_huge_form_fields(api, nothing_stored):
    assert_error(upload(api, request_id="x" * 200_000), 400, "invalid_request")


@pytest.mark.parametrize(
    "field,value",
    [
        ("request_id", "x" * 129),
        ("request_id", "x" * 10_000),
        ("request_id", "bad\x00id"),
        ("request_id", "line\nbreak"),
        ("min_confidence", "NaN"),
        ("min_confidence", "-1"),
        ("min_confidence", "2"),
        ("min_confidence", "abc"),
        ("min_confidence", "inf"),
        ("min_face_size", "0"),
        ("min_face_size", "12.5"),
        ("min_face_size", "99999999999999999999"),
        ("annotation", "sparkles"),
    ],
)
def test_it_rejects_a_malformed_field_and_names_it(api, field, value, nothing_stored):
    error = assert_error(upload(api, **{field: value}), 400, "invalid_request")
    assert field in error["details"]["fields"]


def test_unicode_in_text_fields_is_accepted_and_kept(api):
    response = upload(api, request_id="заказ-№1-😀")
    assert response.status_code == 202
    assert response.json()["request_id"] == "заказ-№1-😀"


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "gopher://example.com/",
        "ftp://example.com/",
        "http://127.0.0.2/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.2]/hook",
        "http://2130706434/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/hook",
        "http://192.168.1.1/hook",
        "http://[fd00::1]/hook",
        "http://0.0.0.0/hook",
        "http://user:pass@example.com/hook",
        "not a url",
        "http:///nohost",
    ],
)
def test_it_refuses_a_callback_url_that_is_not_http_or_resolves_to_a_blocked_address(api, url, nothing_stored):
    error = assert_error(upload(api, callback_url=url), 400, "invalid_callback_url")
    assert error["details"]["field"] == "callback_url"


def test_a_list_filter_with_an_unknown_status_is_refused(api):
    error = assert_error(api.get("/api/v1/images/?status=sleeping"), 400, "invalid_request")
    assert error["details"]["field"] == "status"


def test_it_throttles_a_burst_over_the_clients_rate(api, settings):
    from rest_framework.settings import api_settings

    from api.auth import ClientRateThrottle

    ClientRateThrottle.THROTTLE_RATES = {**api_settings.DEFAULT_THROTTLE_RATES, "client": "3/min"}
    try:
        statuses = [api.get("/api/v1/images/").status_code for _ in range(4)]
        response = api.get("/api/v1/images/")
    finally:
        ClientRateThrottle.THROTTLE_RATES = api_settings.DEFAULT_THROTTLE_RATES

    assert statuses[:3] == [200, 200, 200]
    assert_error(response, 429, "throttled")
    assert int(response["Retry-After"]) > 0


def test_the_rate_limit_weighs_the_previous_window_and_counts_only_allowed_requests():
    from api import auth

    store = auth.rate_limit_redis()
    store.set("throttle:test:previous", 4)
    # Half of the previous window still overlaps: 4 x 0.5 = 2 of a rate of 5 are used.
    allowed = [auth._sliding_window()(keys=["throttle:test:current", "throttle:test:previous"], args=[5, 0.5, 10])
               for _ in range(5)]

    assert allowed == [1, 1, 1, 0, 0]
    assert int(store.get("throttle:test:current")) == 3
    assert 0 < store.ttl("throttle:test:current") <= 10


def test_an_unknown_route_answers_json(api):
    response = api.get("/api/v1/nowhere/")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_a_png_sent_with_a_jpeg_content_type_is_stored_as_what_it_is(api):
    form = {"image": SimpleUploadedFile("photo.jpg", photo("skimage_astronaut.png"), content_type="image/jpeg")}
    response = api.post("/api/v1/images/", form, format="multipart")
    assert response.status_code == 202
    assert Image.objects.get(pk=response.json()["id"]).format == "PNG"


def test_an_empty_multipart_body_is_refused(api, nothing_stored):
    response = api.generic("POST", "/api/v1/images/", b"", content_type="multipart/form-data; boundary=xyz")
    assert_error(response, 400, "invalid_request")


@pytest.mark.parametrize("field", ["request_id", "callback_url", "annotation", "min_face_size", "min_confidence"])
@pytest.mark.parametrize("value", ["\x00", "a\x1bb", "\u202e\u0000", "\ud7ff\x7f"])
def test_control_characters_are_refused_in_every_text_field(api, field, value, nothing_stored):
    error = assert_error(upload(api, **{field: value}), 400, "invalid_request")
    assert field in error["details"]["fields"]


# --- Found by the contract tester (tests/test_api_contract.py) ---------------------------------


@pytest.mark.parametrize("path", ["/api/v1/images/", "/api/v1/batches/"])
@pytest.mark.parametrize("page", ["", "abc", "0", "-1", "1.5", "last", "\u0661"])
def test_a_page_that_is_no_whole_number_from_1_is_refused_on_every_list(api, path, page):
    error = assert_error(api.get(path, {"page": page}), 400, "invalid_request")
    assert error["details"] == {"field": "page"}


@pytest.mark.parametrize("path", ["/api/v1/images/", "/api/v1/batches/"])
def test_a_page_past_the_end_is_not_found_and_page_1_is_the_first(api, path):
    assert_error(api.get(path, {"page": "2"}), 404, "not_found")
    assert api.get(path, {"page": "1"}).json() == api.get(path).json()


@pytest.mark.parametrize("value", ["\x00", "a\x1fb", "x" * 129, ""])
def test_a_malformed_request_id_filter_is_refused_not_a_server_error(api, value):
    error = assert_error(api.get("/api/v1/images/", {"request_id": value}), 400, "invalid_request")
    assert error["details"] == {"field": "request_id"}


@pytest.mark.parametrize("url", ["ftp://example.com/a.jpg", "file:///etc/passwd", "example.com/a.jpg",
                                 "http://user:pw@example.com/a.jpg", "http://exa mple.com/a.jpg", "http:///a.jpg"])
def test_refusing_an_image_url_names_the_image_url(api, url, nothing_stored):
    error = assert_error(api.post("/api/v1/images/", {"image_url": url}, format="json"), 400, "invalid_request")
    assert error["details"] == {"field": "image_url"}
    assert "the image URL" in error["message"] and "callback" not in error["message"]


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "http://user:pw@example.com/hook", "http://0/hook"])
def test_refusing_a_callback_url_names_the_callback_url(api, url, nothing_stored):
    error = assert_error(upload(api, callback_url=url), 400, "invalid_callback_url")
    assert error["details"] == {"field": "callback_url"}
    assert "callback_url is refused" in error["message"]


@pytest.mark.parametrize("field", ["request_id", "callback_url", "min_face_size", "min_confidence", "annotation"])
def test_an_empty_form_field_is_refused_like_a_blank_json_one(api, field, nothing_stored):
    error = assert_error(upload(api, **{field: ""}), 400, "invalid_request")
    assert field in error["details"]["fields"]


def test_the_original_of_an_image_url_not_yet_fetched_is_not_ready(api):
    created = api.post("/api/v1/images/", {"image_url": "http://127.0.0.1:9/a.jpg"}, format="json")
    assert created.status_code == 202, created.content
    assert_error(api.get(f"/api/v1/images/{created.json()['id']}/original"), 409, "not_ready")


def test_a_form_batch_may_name_as_many_image_urls_as_a_batch_holds(api, settings):
    """Django's default cap of form fields (then 20) refused a multipart batch of 30 URLs."""
    urls = [f"http://127.0.0.1:9/{n}.jpg" for n in range(settings.MAX_BATCH_IMAGES)]
    response = api.post("/api/v1/batches/", {"image_urls": urls, "callback_url": "http://127.0.0.1:9/hook"},
                        format="multipart")
    assert response.status_code == 202, response.content
    assert response.json()["counts"]["total"] == settings.MAX_BATCH_IMAGES
    too_many = api.post("/api/v1/batches/", {"image_urls": [*urls, urls[0]]}, format="multipart")
    assert_error(too_many, 400, "invalid_request")
