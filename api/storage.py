"""Object storage behind one small interface: MinIO/S3 (django-minio-storage) or the local disk.

Keys are fixed and derived from the image id, so writing one twice overwrites it: a redelivered
task leaves no second object. Errors are split into `ObjectMissing` (permanent) and
`StorageUnavailable` (worth retrying).
"""

import datetime
import threading

import minio
import urllib3
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage
from minio.error import S3Error
from minio_storage.storage import MinioMediaStorage

CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp"}
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}
MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NoSuchBucket"}


class StorageUnavailable(Exception):
    """The storage server could not be reached or answered with an error: try again later."""


class ObjectMissing(Exception):
    """The object is not there, and waiting will not bring it back."""


def original_key(image_id, image_format):
    return f"originals/{image_id}.{EXTENSIONS[image_format]}"


def annotated_key(image_id, image_format):
    return f"annotated/{image_id}.{EXTENSIONS[image_format]}"


class OverwritingMinioStorage(MinioMediaStorage):
    """MinIO storage whose keys are exact: no renaming when a key exists."""

    def __init__(self):
        # Short timeouts and few retries: an upload facing a dead storage server answers 503 fast.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=2, read=30),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
            maxsize=10,
        )
        client = minio.Minio(
            settings.MINIO_ENDPOINT,
            access_key=settings.MINIO_ACCESS_KEY,
            secret_key=settings.MINIO_SECRET_KEY,
            secure=settings.MINIO_SECURE,
            region=settings.MINIO_REGION,
            http_client=http,
        )
        # Presigned URLs are signed for the host clients reach (MINIO_PUBLIC_ENDPOINT); with the
        # region given, signing one is local work: this client never sends a request.
        self.public_client = minio.Minio(
            settings.MINIO_PUBLIC_ENDPOINT,
            access_key=settings.MINIO_ACCESS_KEY,
            secret_key=settings.MINIO_SECRET_KEY,
            secure=settings.MINIO_PUBLIC_SECURE,
            region=settings.MINIO_REGION,
        )
        super().__init__(
            minio_client=client,
            bucket_name=settings.MINIO_BUCKET,
            auto_create_bucket=True,
            presign_urls=True,
            assume_bucket_exists=False,
        )

    def get_available_name(self, name, max_length=None):
        return name


class OverwritingFileSystemStorage(FileSystemStorage):
    def __init__(self):
        super().__init__(location=settings.MEDIA_ROOT, allow_overwrite=True)


class _LazyStorage:
    """Builds the real storage on first use, so a storage server that is down at start-up
    fails requests (503) rather than the process, and is retried on the next use."""

    def __init__(self):
        self._lock = threading.Lock()
        self._backend = None

    def get(self):
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    try:
                        if settings.STORAGE_BACKEND == "minio":
                            self._backend = OverwritingMinioStorage()
                        else:
                            self._backend = OverwritingFileSystemStorage()
                    except Exception as error:
                        raise StorageUnavailable(f"storage is unreachable: {error}") from error
        return self._backend

    def reset(self):
        self._backend = None


_storage = _LazyStorage()


def build_storage():
    """Django's STORAGES["default"] entry point."""
    return _storage.get()


def _is_minio():
    return settings.STORAGE_BACKEND == "minio"


def _translate(error, key):
    if isinstance(error, ObjectMissing | StorageUnavailable):
        return error
    if isinstance(error, FileNotFoundError):
        return ObjectMissing(key)
    if isinstance(error, S3Error) and error.code in MISSING_CODES:
        return ObjectMissing(key)
    return StorageUnavailable(f"{type(error).__name__}: {error}")


def put(key, data):
    """Write bytes under an exact key, replacing what was there."""
    try:
        _storage.get().save(key, ContentFile(data))
    except Exception as error:
        raise _translate(error, key) from error


def read(key):
    """The object's bytes."""
    try:
        with _storage.get().open(key, "rb") as f:
            return f.read()
    except Exception as error:
        raise _translate(error, key) from error


def delete(key):
    """Remove an object; a missing one is not an error."""
    if not key:
        return
    try:
        _storage.get().delete(key)
    except Exception as error:
        translated = _translate(error, key)
        if not isinstance(translated, ObjectMissing):
            raise translated from error


def exists(key):
    try:
        backend = _storage.get()
        if _is_minio():
            backend.client.stat_object(backend.bucket_name, key)
            return True
        return backend.exists(key)
    except Exception as error:
        translated = _translate(error, key)
        if isinstance(translated, ObjectMissing):
            return False
        raise translated from error


def presigned_url(key):
    """A short-lived URL for the object at the public endpoint, or None where the backend cannot
    make one."""
    if not _is_minio():
        return None
    backend = _storage.get()
    return backend.public_client.presigned_get_object(
        backend.bucket_name, key, expires=datetime.timedelta(seconds=settings.PRESIGNED_URL_SECONDS)
    )


def check():
    """Raise StorageUnavailable unless the storage answers now."""
    try:
        backend = _storage.get()
        if _is_minio():
            if not backend.client.bucket_exists(backend.bucket_name):
                raise StorageUnavailable(f"bucket {backend.bucket_name} is missing")
        elif not settings.MEDIA_ROOT.is_dir() and not _make_media_root():
            raise StorageUnavailable(f"{settings.MEDIA_ROOT} is not a directory")
    except StorageUnavailable:
        raise
    except Exception as error:
        raise StorageUnavailable(str(error)) from error


def _make_media_root():
    settings.MEDIA_ROOT.mkdir(parents=True, exist_ok=True)
    return True

