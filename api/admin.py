"""The operators' UI: clients, and images with their faces, callback attempts and actions."""

import base64

from django.contrib import admin, messages
from django.utils.html import format_html

from workers import pipeline

from . import storage
from .models import Batch, CallbackAttempt, Client, Face, Image


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


class FaceInline(admin.TabularInline):
    model = Face
    fields = ["index", "x", "y", "width", "height", "confidence", "keypoints"]
    readonly_fields = fields
    extra = 0
    can_delete = False

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
    list_display = ["id", "status", "client", "request_id", "face_count", "callback_status", "created_at", "duration"]
    list_filter = ["status", "callback_status", "annotation", "client", ("created_at", admin.DateFieldListFilter)]
    search_fields = ["=id", "request_id"]
    list_select_related = ["client"]
    date_hierarchy = "created_at"
    inlines = [FaceInline, CallbackAttemptInline]
    actions = ["rerun_pipeline", "resend_callback"]
    readonly_fields = [
        "id", "client", "batch", "request_id", "source_url", "status", "error_code", "error_message", "preview",
        "width", "height", "format", "size_bytes", "sha256", "original_key", "annotated_key",
        "min_face_size", "min_confidence", "annotation", "face_count", "attempts",
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

    @admin.display(description="annotated image")
    def preview(self, image):
        if image.status != Image.Status.DONE or not image.annotated_key:
            return "-"
        try:
            data = storage.read(image.annotated_key)
        except (storage.ObjectMissing, storage.StorageUnavailable) as error:
            return f"unavailable: {error}"
        mime = "image/png" if image.annotated_key.endswith(".png") else "image/jpeg"
        # Inline data URI: the admin needs no storage credentials of its own or an extra route.
        return format_html('<img src="data:{};base64,{}" style="max-width:640px;max-height:480px">',
                           mime, base64.b64encode(data).decode())

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
