"""Property-based fuzzing of the API: whatever a client sends, the answer is never a 5xx and
every error has the SPEC's shape."""

import io

import PIL.Image
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.conftest import photo

pytestmark = pytest.mark.django_db

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=300)
field_values = st.one_of(text, st.integers().map(str), st.floats(allow_nan=True).map(str), st.just(""))


def small_image(fmt):
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (32, 32), "white").save(buffer, fmt)
    return buffer.getvalue()


image_bytes = st.one_of(
    st.binary(max_size=2048),
    st.sampled_from([small_image("PNG"), small_image("JPEG"), small_image("BMP"), small_image("GIF"),
                     photo("clm_cage.jpg")[:5000], b""]),
    st.binary(max_size=64).map(lambda tail: small_image("PNG")[:40] + tail),
)


def assert_well_formed(response):
    assert response.status_code < 500, response.content
    if response.status_code >= 400:
        body = response.json()
        assert set(body["error"]) == {"code", "message", "details"}


@FUZZ
@given(
    data=image_bytes,
    filename=text,
    fields=st.dictionaries(
        st.sampled_from(["request_id", "callback_url", "min_face_size", "min_confidence", "annotation", "unknown"]),
        field_values,
    ),
)
def test_uploads_never_cause_a_server_error(api, data, filename, fields):
    # The test client itself refuses names that are not a plain file name; the server gets the rest.
    name = filename.replace("\x00", "").replace("/", "_").replace("\\", "_").strip()
    upload = SimpleUploadedFile(name if name not in ("", ".", "..") else "x", data)
    assert_well_formed(api.post("/api/v1/images/", {"image": upload, **fields}, format="multipart"))


@FUZZ
@given(path=text, query=st.dictionaries(st.sampled_from(["status", "request_id", "page"]), field_values))
def test_reads_never_cause_a_server_error(api, path, query):
    from urllib.parse import quote

    for url in (f"/api/v1/images/{quote(path, safe='')}/", f"/api/v1/images/{quote(path, safe='')}/annotated"):
        assert_well_formed(api.get(url))
    assert_well_formed(api.get("/api/v1/images/", {k: v.replace("\x00", "") for k, v in query.items()}))


@FUZZ
@given(body=st.binary(max_size=1024), content_type=st.sampled_from(
    ["multipart/form-data; boundary=xyz", "multipart/form-data", "application/json", "text/plain", "image/jpeg"]))
def test_raw_bodies_never_cause_a_server_error(api, body, content_type):
    assert_well_formed(api.generic("POST", "/api/v1/images/", body, content_type=content_type))
