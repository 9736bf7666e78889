"""The operators' UI: clients, images with their faces, callback attempts and actions, and the
callback endpoints' circuit breakers."""

import io

import PIL.Image
from django.contrib import admin, messages
from django.http import Http404, HttpResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from workers import pipeline

from . import storage
from .models import Batch, CallbackAttempt, CallbackEndpoint, Client, Face, Image


@admin.register(Client)
class ClientAdmin(admin.ModelAdmin):
    list_display = ["name", "is_active", "created_at", "image_count"]
    list_filter = ["is_active"]
    search_fields = ["name"]
    # Secrets are neither shown nor editable: create clients with `manage.py create_client`.
    fields = ["name", "is_active", "created_at"]
    readonly_fields = ["created_at"]

    def has_add_permission(self, request):
        return False

    @admin.display(description="images")
    def image_count(self, client):
        return client.images.count()


def _reading(group, name):
    """A face inline column: one value of the face's `pose` or `quality` ("-" on faces from before them)."""

    @admin.display(description=name)
    def column(self, face):
        return (getattr(face, group) or {}).get(name, "-")

    return column


class FaceInline(admin.TabularInline):
    model = Face
    fields = ["index", "x", "y", "width", "height", "confidence", "yaw", "pitch", "roll", "sharpness", "brightness",
              "contrast", "ipd", "keypoints"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    yaw, pitch, roll = (_reading("pose", name) for name in ("yaw", "pitch", "roll"))
    sharpness, brightness, contrast, ipd = (_reading("quality", name) for name in ("sharpness", "brightness", "contrast", "ipd"))

    def has_add_permission(self, request, obj=None):
        return False


class CallbackAttemptInline(admin.TabularInline):
    model = CallbackAttempt
    fields = ["number", "event_id", "attempted_at", "status_code", "latency_ms", "error"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Image)
class ImageAdmin(admin.ModelAdmin):
    list_display = ["thumbnail", "id", "status", "client", "request_id", "engine", "face_count", "callback_status",
                    "created_at", "duration"]
    list_filter = ["status", "callback_status", "engine", "annotation", "client", ("created_at", admin.DateFieldListFilter)]
    search_fields = ["=id", "request_id"]
    list_select_related = ["client"]
    date_hierarchy = "created_at"
    inlines = [FaceInline, CallbackAttemptInline]
    actions = ["rerun_pipeline", "resend_callback"]
    readonly_fields = [
        "id", "client", "batch", "request_id", "source_url", "status", "error_code", "error_message", "preview",
        "width", "height", "format", "size_bytes", "sha256", "original_key", "annotated_key",
        "engine", "min_face_size", "min_confidence", "annotation", "face_count", "attempts",
        "created_at", "enqueued_at", "started_at", "finished_at", "detect_ms",
        "callback_url", "callback_status", "callback_event_id", "callback_attempts",
        "callback_last_status_code", "callback_next_attempt_at",
    ]
    fields = readonly_fields

    def has_add_permission(self, request):
        return False

    @admin.display(description="duration")
    def duration(self, image):
        total = image.timings_ms["total"]
        return f"{total / 1000:.2f} s" if total is not None else "-"

    def get_urls(self):
        annotated = path("<uuid:image_id>/annotated/<int:size>/", self.admin_site.admin_view(self.annotated_view),
                         name="api_image_annotated")
        return [annotated, *super().get_urls()]

    def annotated_view(self, request, image_id, size):
        """The annotated image scaled to fit `size` pixels, for operators only."""
        image = Image.objects.filter(pk=image_id, status=Image.Status.DONE).exclude(annotated_key="").first()
        if image is None:
            raise Http404
        try:
            data = storage.read(image.annotated_key)
        except (storage.ObjectMissing, storage.StorageUnavailable):
            raise Http404 from None
        picture = PIL.Image.open(io.BytesIO(data))
        picture.thumbnail((min(size, 2048), min(size, 2048)))
        buffer = io.BytesIO()
        picture.convert("RGB").save(buffer, "JPEG", quality=85)
        response = HttpResponse(buffer.getvalue(), content_type="image/jpeg")
        response["Cache-Control"] = "private, max-age=3600"
        return response

    def _picture(self, image, size, style):
        if image.status != Image.Status.DONE or not image.annotated_key:
            return "-"
        url = reverse("admin:api_image_annotated", args=[image.pk, size])
        return format_html('<img src="{}" loading="lazy" alt="annotated" style="{}">', url, style)

    @admin.display(description="")
    def thumbnail(self, image):
        return self._picture(image, 96, "max-width:96px;max-height:96px")

    @admin.display(description="annotated image")
    def preview(self, image):
        return self._picture(image, 800, "max-width:800px")

    @admin.action(description="Re-run the pipeline")
    def rerun_pipeline(self, request, queryset):
        count = sum(pipeline.rerun(image.pk) for image in queryset)
        self.message_user(request, f"{count} image(s) queued again (finished images only).", messages.SUCCESS)

    @admin.action(description="Re-send the callback")
    def resend_callback(self, request, queryset):
        count = sum(pipeline.resend_callback(image.pk) for image in queryset)
        self.message_user(request, f"{count} callback(s) queued (finished images with a callback URL only).", messages.SUCCESS)


class BatchImageInline(admin.TabularInline):
    model = Image
    fields = ["id", "status", "face_count", "error_code", "callback_status"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Batch)
class BatchAdmin(admin.ModelAdmin):
    list_display = ["id", "status", "client", "image_count", "callback_status", "created_at", "finished_at"]
    list_filter = ["status", "callback_status", "client"]
    search_fields = ["=id"]
    list_select_related = ["client"]
    inlines = [BatchImageInline, CallbackAttemptInline]
    readonly_fields = ["id", "client", "status", "created_at", "finished_at", "callback_url", "callback_status",
                       "callback_event_id", "callback_attempts", "callback_last_status_code", "callback_next_attempt_at"]
    fields = readonly_fields

    def has_add_permission(self, request):
        return False

    @admin.display(description="images")
    def image_count(self, batch):
        return batch.images.count()


@admin.register(CallbackEndpoint)
class CallbackEndpointAdmin(admin.ModelAdmin):
    """Each receiver (scheme, host, port) that ever failed, and its circuit breaker."""

    list_display = ["__str__", "state", "consecutive_failures", "state_since", "open_until", "last_failure_at",
                    "short_error"]
    list_filter = ["state"]
    search_fields = ["host"]
    ordering = ["-state", "-consecutive_failures", "host"]
    readonly_fields = ["scheme", "host", "port", "state", "consecutive_failures", "failed_probes", "last_error",
                       "last_failure_at", "state_since", "open_until"]
    fields = readonly_fields
    actions = ["close_circuit"]

    def has_add_permission(self, request):
        return False

    @admin.display(description="last error")
    def short_error(self, endpoint):
        return endpoint.last_error[:120]

    @admin.action(description="Close the circuit (send again now)")
    def close_circuit(self, request, queryset):
        count = queryset.update(state=CallbackEndpoint.State.CLOSED, consecutive_failures=0, failed_probes=0,
                                open_until=None, state_since=timezone.now())
        self.message_user(request, f"{count} endpoint(s) closed.", messages.SUCCESS)
