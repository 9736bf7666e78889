"""Thin views: validate, hand over to the pipeline's rules, respond."""

import logging

from django.conf import settings
from django.db import connection
from django.http import HttpResponse, HttpResponseRedirect
from django.urls import reverse
from kombu import Connection
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from workers import pipeline

from . import errors, schema, storage
from .models import Batch, Image
from .serializers import BatchSerializer, BatchSubmitSerializer, ImageSerializer, ImageUploadSerializer
from .uploads import inspect_image

logger = logging.getLogger(__name__)

# Room for the multipart envelope and the small form fields around the image.
MULTIPART_OVERHEAD = 64 * 1024
UUID_PATTERN = "[0-9a-fA-F-]{36}"


@extend_schema_view(
    list=extend_schema(summary="Your images, newest first", parameters=schema.LIST_FILTERS,
                       responses={200: ImageSerializer(many=True), **schema.ERRORS}),
    retrieve=extend_schema(summary="One image: status, faces, URLs, callback state", responses={200: ImageSerializer, **schema.ERRORS}),
    destroy=extend_schema(summary="Delete an image and its files now", responses={204: None, **schema.ERRORS}),
)
class ImageViewSet(
    mixins.CreateModelMixin, mixins.RetrieveModelMixin, mixins.ListModelMixin, mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Submit photos, follow their status, download originals and annotated output."""

    serializer_class = ImageSerializer
    lookup_value_regex = UUID_PATTERN

    def get_queryset(self):
        # A client sees only its own images: everything else is a 404.
        queryset = Image.objects.filter(client=self.request.user).prefetch_related("faces")
        if self.action == "list":
            queryset = self._filtered(queryset)
        return queryset

    def _filtered(self, queryset):
        wanted = self.request.query_params.get("status")
        if wanted is not None:
            if wanted not in Image.Status.values:
                raise errors.invalid_request(f"status must be one of {', '.join(Image.Status.values)}", {"field": "status"})
            queryset = queryset.filter(status=wanted)
        request_id = self.request.query_params.get("request_id")
        if request_id is not None:
            # The same rules as the upload's field: a NUL would not even reach PostgreSQL.
            try:
                request_id = ImageUploadSerializer().fields["request_id"].run_validation(request_id)
            except ValidationError as error:
                raise errors.invalid_request(f"request_id: {error.detail[0]}", {"field": "request_id"}) from None
            queryset = queryset.filter(request_id=request_id)
        return queryset

    @extend_schema(
        summary="Submit a photo (file or image_url)",
        request={"multipart/form-data": ImageUploadSerializer, "application/json": ImageUploadSerializer},
        responses={
            202: OpenApiResponse(ImageSerializer, description="accepted: stored, committed, queued (Location header)"),
            200: OpenApiResponse(ImageSerializer, description="the same request_id and image again: the existing job"),
            409: OpenApiResponse(schema.Error, description="conflict: request_id used for another image"),
            413: OpenApiResponse(schema.Error, description="image_too_large"),
            **schema.ERRORS,
        },
        callbacks=schema.image_callbacks(),
    )
    def create(self, request, *args, **kwargs):
        declared = request.META.get("CONTENT_LENGTH") or "0"
        if declared.isdigit() and int(declared) > settings.MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD:
            raise errors.image_too_large(f"The request is larger than {settings.MAX_UPLOAD_BYTES} bytes.")
        if len(request.FILES.getlist("image")) > 1:
            raise errors.invalid_request("Send exactly one image part.", {"field": "image"})

        form = ImageUploadSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        options = dict(form.validated_data)
        upload, url = options.pop("image", None), options.pop("image_url", None)
        data = inspected = None
        if upload:
            data = _read(upload)
            inspected = inspect_image(data)

        try:
            image, created = pipeline.submit(request.user, options, data=data, inspected=inspected, url=url)
        except pipeline.RequestIdConflict:
            raise errors.conflict("This request_id was already used with a different image.") from None
        except storage.StorageUnavailable:
            logger.warning("upload refused: storage unavailable", exc_info=True)
            raise errors.service_unavailable("Storage is unavailable; nothing was accepted. Try again.") from None

        body = ImageSerializer.represent(image, self.get_serializer_context())
        if not created:
            return Response(body, status=status.HTTP_200_OK)
        return Response(body, status=status.HTTP_202_ACCEPTED, headers={"Location": body_url(request, image)})

    def retrieve(self, request, *args, **kwargs):
        # The status poll: as DRF's, with the kept serializer.
        return Response(ImageSerializer.represent(self.get_object(), self.get_serializer_context()))

    def perform_destroy(self, image):
        try:
            pipeline.delete(image)
        except storage.StorageUnavailable:
            raise errors.service_unavailable("Storage is unavailable. Try again.") from None

    @extend_schema(summary="The original bytes", responses={
        (200, "image/*"): OpenApiTypes.BINARY, 302: OpenApiResponse(description="to a presigned URL"),
        409: OpenApiResponse(schema.Error, description="not_ready: an image_url not fetched yet"), **schema.ERRORS})
    def original(self, request, pk=None):
        image = self.get_object()
        if not image.original_key:
            raise errors.not_ready("The image at image_url has not been fetched yet.")
        return _download(image.original_key, storage.CONTENT_TYPES[image.format])

    @extend_schema(summary="The annotated image (no EXIF)", responses={
        (200, "image/*"): OpenApiTypes.BINARY, 302: OpenApiResponse(description="to a presigned URL"),
        409: OpenApiResponse(schema.Error, description="not_ready"), **schema.ERRORS})
    def annotated(self, request, pk=None):
        image = self.get_object()
        if image.status != Image.Status.DONE or not image.annotated_key:
            raise errors.not_ready("The annotated image is not ready yet.")
        content_type = "image/png" if image.annotated_key.endswith(".png") else "image/jpeg"
        return _download(image.annotated_key, content_type)


def _read(upload):
    if upload.size > settings.MAX_UPLOAD_BYTES:
        raise errors.image_too_large(f"The image is larger than {settings.MAX_UPLOAD_BYTES} bytes.")
    return upload.read()


@extend_schema_view(
    list=extend_schema(summary="Your batches, newest first", responses={200: BatchSerializer(many=True), **schema.ERRORS}),
    retrieve=extend_schema(summary="One batch: counts and every image", responses={200: BatchSerializer, **schema.ERRORS}),
)
class BatchViewSet(mixins.CreateModelMixin, mixins.RetrieveModelMixin, mixins.ListModelMixin, viewsets.GenericViewSet):
    """Submit several images at once and follow them together."""

    serializer_class = BatchSerializer
    lookup_value_regex = UUID_PATTERN

    def get_queryset(self):
        return Batch.objects.filter(client=self.request.user).prefetch_related("images__faces")

    @extend_schema(
        summary="Submit several photos (files and/or URLs), all or nothing",
        request={"multipart/form-data": BatchSubmitSerializer, "application/json": BatchSubmitSerializer},
        responses={202: BatchSerializer, 413: OpenApiResponse(schema.Error, description="image_too_large"), **schema.ERRORS},
    )
    def create(self, request, *args, **kwargs):
        declared = request.META.get("CONTENT_LENGTH") or "0"
        if declared.isdigit() and int(declared) > settings.MAX_BATCH_BYTES + MULTIPART_OVERHEAD:
            raise errors.image_too_large(f"The request is larger than {settings.MAX_BATCH_BYTES} bytes.")
        form = BatchSubmitSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        options = dict(form.validated_data)
        uploads = []
        for index, upload in enumerate(options.pop("images", [])):
            data = _read(upload)
            try:
                uploads.append((data, inspect_image(data)))
            except errors.ApiError as error:
                error.details = {**error.details, "field": "images", "index": index}
                raise
        try:
            batch = pipeline.submit_batch(
                request.user, options, uploads=uploads, urls=options.pop("image_urls", []),
                callback_url=options.pop("callback_url", ""), image_callback_url=options.pop("image_callback_url", ""),
            )
        except storage.StorageUnavailable:
            logger.warning("batch refused: storage unavailable", exc_info=True)
            raise errors.service_unavailable("Storage is unavailable; nothing was accepted. Try again.") from None
        batch = self.get_queryset().get(pk=batch.pk)
        location = request.build_absolute_uri(reverse("batch-detail", args=[batch.pk]))
        return Response(self.get_serializer(batch).data, status=status.HTTP_202_ACCEPTED, headers={"Location": location})


def body_url(request, image):
    return request.build_absolute_uri(reverse("image-detail", args=[image.pk]))


def _download(key, content_type):
    try:
        if settings.DOWNLOAD_REDIRECT:
            url = storage.presigned_url(key)
            if url:
                return HttpResponseRedirect(url)
        data = storage.read(key)
    except storage.ObjectMissing:
        raise errors.ApiError(404, "not_found", "The stored object is gone.") from None
    except storage.StorageUnavailable:
        raise errors.service_unavailable("Storage is unavailable. Try again.") from None
    response = HttpResponse(data, content_type=content_type)
    response["Cache-Control"] = "private, max-age=3600"
    return response


class HealthView(APIView):
    """GET /api/v1/health/: database, broker and storage, each checked for real."""

    authentication_classes = []
    permission_classes = []
    throttle_classes = []

    @extend_schema(summary="Database, broker and storage, checked now", auth=[], responses={
        (200, "application/json"): schema.Health, (503, "application/json"): schema.Health})
    def get(self, request):
        checks = {"database": _check(_database), "broker": _check(_broker), "storage": _check(storage.check)}
        healthy = all(value == "ok" for value in checks.values())
        return Response(
            {"status": "ok" if healthy else "unavailable", "checks": checks},
            status=status.HTTP_200_OK if healthy else status.HTTP_503_SERVICE_UNAVAILABLE,
        )


def _check(probe):
    try:
        probe()
        return "ok"
    except Exception as error:
        logger.warning("health check failed: %s", error)
        return f"error: {type(error).__name__}"


def _database():
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _broker():
    with Connection(settings.CELERY_BROKER_URL, connect_timeout=2) as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
