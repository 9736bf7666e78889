"""The image resource as integrators and callbacks see it, and the upload form's validation."""

import math

from django.conf import settings
from rest_framework import serializers
from rest_framework.reverse import reverse

from workers.callbacks import BlockedAddress, check_callback_url

from . import errors
from .models import Image

KEYPOINTS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


def _no_control_characters(value):
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise serializers.ValidationError("must not contain control characters")
    return value


class ImageUploadSerializer(serializers.Serializer):
    """The multipart form of POST /api/v1/images/. The image bytes are inspected in the view."""

    image = serializers.FileField(allow_empty_file=True)
    request_id = serializers.CharField(max_length=128, required=False, allow_blank=False, validators=[_no_control_characters])
    callback_url = serializers.CharField(max_length=2000, required=False, allow_blank=False, validators=[_no_control_characters])
    min_face_size = serializers.IntegerField(min_value=1, max_value=10000, default=20)
    min_confidence = serializers.FloatField(min_value=0.0, max_value=1.0, default=0.9)
    annotation = serializers.ChoiceField(choices=Image.Annotation.choices, default=Image.Annotation.BOXES)

    def validate_min_confidence(self, value):
        if not math.isfinite(value):
            raise serializers.ValidationError("must be a number between 0 and 1")
        return value

    def validate_callback_url(self, value):
        try:
            check_callback_url(value)
        except (ValueError, BlockedAddress) as error:
            raise errors.ApiError(400, "invalid_callback_url", f"callback_url is refused: {error}", {"field": "callback_url"})
        return value


class FaceSerializer(serializers.Serializer):
    def to_representation(self, face):
        return {
            "box": {"x": face.x, "y": face.y, "width": face.width, "height": face.height},
            "confidence": round(face.confidence, 6),
            "keypoints": {name: {"x": face.keypoints[name][0], "y": face.keypoints[name][1]} for name in KEYPOINTS},
        }


class ImageSerializer(serializers.ModelSerializer):
    """The image resource of the SPEC (section 2)."""

    error = serializers.SerializerMethodField()
    face_count = serializers.SerializerMethodField()
    faces = serializers.SerializerMethodField()
    original_url = serializers.SerializerMethodField()
    annotated_url = serializers.SerializerMethodField()
    callback = serializers.SerializerMethodField()
    timings_ms = serializers.ReadOnlyField()

    class Meta:
        model = Image
        fields = [
            "id", "request_id", "status", "error", "width", "height", "face_count", "faces", "annotation",
            "min_face_size", "min_confidence", "original_url", "annotated_url", "callback",
            "created_at", "started_at", "finished_at", "timings_ms",
        ]

    def _done(self, image):
        return image.status == Image.Status.DONE

    def get_error(self, image):
        if image.status != Image.Status.FAILED:
            return None
        return {"code": image.error_code, "message": image.error_message}

    def get_face_count(self, image):
        return image.face_count if self._done(image) else None

    def get_faces(self, image):
        if not self._done(image):
            return None
        return FaceSerializer(image.faces.all(), many=True).data

    def get_original_url(self, image):
        return self._url("image-original", image)

    def get_annotated_url(self, image):
        if not self._done(image):
            return None
        return self._url("image-annotated", image)

    def get_callback(self, image):
        if not image.callback_url:
            return None
        return {
            "url": image.callback_url,
            "status": image.callback_status,
            "attempts": image.callback_attempts,
            "last_status_code": image.callback_last_status_code,
        }

    def _url(self, name, image):
        """Absolute URL: from the request in the API, from PUBLIC_BASE_URL in a callback."""
        request = self.context.get("request")
        path = reverse(name, args=[image.pk])
        return request.build_absolute_uri(path) if request else settings.PUBLIC_BASE_URL + path
