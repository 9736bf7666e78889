"""The baseline's one endpoint for `bench.ingest`: POST /upload/ with a multipart `image`.

The same work as the platform's upload, written the plain way: Pillow reads the header only, the
bytes are written to storage, a row is inserted, and after the commit one Celery message is
published with publisher confirms (`send_task`, one connection pool per process).
"""

import hashlib
import io
import uuid

import PIL.Image
from celery import Celery
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.urls import path
from rest_framework import status
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from api.models import Image

celery_app = Celery("bench_plain", set_as_current=False)
celery_app.conf.update(
    broker_url=settings.PLAIN_BROKER_URL,
    broker_transport_options={"confirm_publish": True},
    broker_connection_timeout=2,
    task_serializer="json",
    task_ignore_result=True,
    task_default_queue=settings.PLAIN_QUEUE,
)

EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}


class PlainUpload(APIView):
    authentication_classes = []
    permission_classes = []
    throttle_classes = []
    parser_classes = [MultiPartParser]

    def post(self, request):
        upload = request.FILES.get("image")
        if upload is None:
            return Response({"error": "image is required"}, status=status.HTTP_400_BAD_REQUEST)
        data = upload.read()
        try:
            with PIL.Image.open(io.BytesIO(data), formats=tuple(EXTENSIONS)) as image:
                image_format, (width, height) = image.format, image.size
        except Exception:
            return Response({"error": "not an image"}, status=status.HTTP_400_BAD_REQUEST)

        image_id = uuid.uuid4()
        key = f"originals/{image_id}.{EXTENSIONS[image_format]}"
        default_storage.save(key, ContentFile(data))
        with transaction.atomic():
            Image.objects.create(
                id=image_id, client_id=settings.PLAIN_CLIENT_ID, original_key=key,
                sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), format=image_format,
                width=width, height=height,
            )
            transaction.on_commit(
                lambda: celery_app.send_task("workers.tasks.detect_faces", args=[str(image_id)], queue=settings.PLAIN_QUEUE)
            )
        return Response({"id": str(image_id), "status": "queued"}, status=status.HTTP_202_ACCEPTED)


urlpatterns = [path("upload/", PlainUpload.as_view())]
