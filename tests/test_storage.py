"""Storage on both backends: exact keys, overwrite, missing objects, and an unreachable server;
and the S3 server itself: it checks signatures and presigned-URL expiry, and presigned URLs are
built for the public endpoint."""

import pytest
import requests
from minio.error import S3Error

from api import storage
from tests.conftest import wait_for


@pytest.fixture(params=["minio", "filesystem"])
def backend(request, settings, tmp_path):
    settings.STORAGE_BACKEND = request.param
    settings.MEDIA_ROOT = tmp_path
    storage._storage.reset()
    yield request.param
    storage._storage.reset()


def test_put_then_read_returns_the_bytes_under_the_exact_key(backend):
    storage.put("originals/abc.jpg", b"first")
    storage.put("originals/abc.jpg", b"second")  # a redelivered task overwrites, never renames

    assert storage.read("originals/abc.jpg") == b"second"
    assert storage.exists("originals/abc.jpg")


def test_a_missing_object_is_reported_as_missing(backend):
    with pytest.raises(storage.ObjectMissing):
        storage.read("originals/nothing-here.jpg")
    assert not storage.exists("originals/nothing-here.jpg")


def test_delete_removes_and_tolerates_a_missing_object(backend):
    storage.put("annotated/x.png", b"data")
    storage.delete("annotated/x.png")
    storage.delete("annotated/x.png")
    assert not storage.exists("annotated/x.png")


def test_the_check_passes_on_a_live_backend(backend):
    storage.check()


def test_presigned_urls_exist_only_for_minio(backend):
    storage.put("originals/p.jpg", b"data")
    url = storage.presigned_url("originals/p.jpg")
    if backend == "minio":
        import requests

        assert "X-Amz-Signature=" in url
        assert requests.get(url, timeout=5).content == b"data"
    else:
        assert url is None


def test_an_unreachable_server_is_unavailable_not_missing(settings):
    from tests.testenv import free_port

    settings.STORAGE_BACKEND = "minio"
    settings.MINIO_ENDPOINT = f"127.0.0.1:{free_port()}"
    storage._storage.reset()
    try:
        for operation in (lambda: storage.put("k", b"x"), lambda: storage.read("k"), storage.check):
            with pytest.raises(storage.StorageUnavailable):
                operation()
    finally:
        storage._storage.reset()


@pytest.fixture
def s3(settings):
    settings.STORAGE_BACKEND = "minio"
    storage._storage.reset()
    yield
    storage._storage.reset()


def test_a_presigned_url_names_the_public_endpoint_and_works_there(s3, settings, s3_server):
    """Signed for the host clients use: the same URL sent to the internal address is refused."""
    settings.MINIO_PUBLIC_ENDPOINT = f"localhost:{s3_server.port}"
    storage._storage.reset()
    storage.put("originals/public.jpg", b"public bytes")

    url = storage.presigned_url("originals/public.jpg")

    assert url.startswith(f"http://localhost:{s3_server.port}/{settings.MINIO_BUCKET}/originals/public.jpg?")
    assert requests.get(url, timeout=10).content == b"public bytes"
    internal = url.replace(f"localhost:{s3_server.port}", settings.MINIO_ENDPOINT)
    assert requests.get(internal, timeout=10).status_code == 403


def test_the_server_refuses_an_expired_presigned_url(s3, settings):
    settings.PRESIGNED_URL_SECONDS = 1
    storage.put("originals/short-lived.jpg", b"data")
    url = storage.presigned_url("originals/short-lived.jpg")

    def refusal():
        response = requests.get(url, timeout=10)
        return response.status_code == 403 and response.text

    assert "expired" in wait_for(refusal, timeout=15, message="the presigned URL to be refused").lower()


def test_the_server_refuses_a_wrong_secret(s3, settings, s3_server):
    with pytest.raises(S3Error) as refused:
        s3_server.client(secret_key="not-the-secret").bucket_exists(settings.MINIO_BUCKET)
    assert refused.value.code == "SignatureDoesNotMatch"

    settings.MINIO_SECRET_KEY = "not-the-secret"
    storage._storage.reset()
    with pytest.raises(storage.StorageUnavailable):
        storage.put("originals/forged.jpg", b"data")
