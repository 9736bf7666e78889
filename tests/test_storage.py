"""Storage on both backends: exact keys, overwrite, missing objects, and an unreachable server."""

import pytest

from api import storage


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
