"""The image resource as integrators and callbacks see it, and the upload form's validation."""

import math
import re
import threading

from django.conf import settings
from django.core.validators import RegexValidator
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.reverse import reverse
from rest_framework.utils import html

from workers.callbacks import BlockedAddress, check_url
from workers.detection import DEFAULT_MIN_CONFIDENCE

from . import errors, schema
from .models import Batch, Image

# Text fields are checked as sent (no trimming): no control characters (PostgreSQL cannot even
# store a NUL). drf-spectacular writes the pattern into the schema with ECMA anchors.
TEXT_PATTERN = r"\A[^\x00-\x1f\x7f]*\Z"
NO_CONTROL_CHARACTERS = RegexValidator(TEXT_PATTERN, "must not contain control characters")
# An http(s) URL with a host, no credentials, no spaces or control characters: the schema's
# pattern, in a syntax Python and ECMA read alike (matched whole here). check_url then refuses a
# host that does not resolve, or resolves to an address the platform may not reach.
HTTP_URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[^\x00-\x20\x7f/?#@]+(?:[/?#][^\x00-\x20\x7f]*)?$"


@extend_schema_field({"type": "string", "format": "uri", "pattern": HTTP_URL_PATTERN})
class HttpUrlField(serializers.CharField):
    """An http(s) URL as sent; the serializers' validate_* methods check it (_checked_url)."""

    def __init__(self, **kwargs):
        super().__init__(max_length=2000, allow_blank=False, trim_whitespace=False, validators=[NO_CONTROL_CHARACTERS],
                         **kwargs)


def _checked_url(value, field, code="invalid_request"):
    """An http(s) URL whose host resolves only to addresses the platform may reach."""
    name = "the image URL" if field.startswith("image_url") else "the callback URL"
    try:
        if not re.fullmatch(HTTP_URL_PATTERN, value):
            raise ValueError(f"{name} must be an http or https URL with a host, without spaces or credentials")
        check_url(value, name)
    except (ValueError, BlockedAddress) as error:
        raise errors.ApiError(400, code, f"{field} is refused: {error}", {"field": field}) from None
    return value


def _text(max_length):
    return serializers.CharField(max_length=max_length, required=False, allow_blank=False, trim_whitespace=False,
                                 validators=[NO_CONTROL_CHARACTERS])


class OptionsSerializer(serializers.Serializer):
    """Detection options, the same for a single image and a batch."""

    def to_internal_value(self, data):
        # DRF reads an empty form field as an omitted one; the schema, and JSON, call it blank.
        if html.is_html_input(data):
            blank = [name for name in self.fields if name in data and "" in data.getlist(name)]
            if blank:
                raise serializers.ValidationError({name: ["This field may not be blank."] for name in blank})
        return super().to_internal_value(data)

    min_face_size = serializers.IntegerField(min_value=1, max_value=10000, default=20)
    min_confidence = serializers.FloatField(
        min_value=0.0, max_value=1.0, required=False,
        help_text="faces below it are dropped; default: the engine's own, "
        + ", ".join(f"{engine} {value}" for engine, value in DEFAULT_MIN_CONFIDENCE.items())
        + " (each chosen for the best F1 on annotated photos)",
    )
    annotation = serializers.ChoiceField(choices=Image.Annotation.choices, default=Image.Annotation.BOXES)
    engine = serializers.ChoiceField(
        choices=Image.Engine.choices, default=Image.Engine.MTCNN,
        help_text="mtcnn: the mtcnn package's MTCNN; blazeface: MediaPipe's BlazeFace full-range, several times faster",
    )

    def validate_min_confidence(self, value):
        if not math.isfinite(value):
            raise serializers.ValidationError("must be a number between 0 and 1")
        return value

    def validate(self, attrs):
        attrs.setdefault("min_confidence", DEFAULT_MIN_CONFIDENCE[attrs["engine"]])
        return attrs


class ImageUploadSerializer(OptionsSerializer):
    """POST /api/v1/images/: a file (multipart) or an `image_url` to fetch. The bytes of a file
    are inspected in the view; a URL's are inspected by the worker that fetches them."""

    image = serializers.FileField(required=False, allow_empty_file=True)
    image_url = HttpUrlField(required=False)
    request_id = _text(128)
    callback_url = HttpUrlField(required=False)

    def validate_image_url(self, value):
        return _checked_url(value, "image_url")

    def validate_callback_url(self, value):
        return _checked_url(value, "callback_url", "invalid_callback_url")

    def validate(self, attrs):
        if ("image" in attrs) == ("image_url" in attrs):
            raise serializers.ValidationError({"image": "send either an image file or an image_url, not both"})
        return super().validate(attrs)


class BatchSubmitSerializer(OptionsSerializer):
    """POST /api/v1/batches/: several `images` (multipart parts) and/or `image_urls`."""

    images = serializers.ListField(child=serializers.FileField(allow_empty_file=True), required=False,
                                   max_length=settings.MAX_BATCH_IMAGES)
    image_urls = serializers.ListField(child=HttpUrlField(), required=False, max_length=settings.MAX_BATCH_IMAGES)
    callback_url = HttpUrlField(required=False)
    image_callback_url = HttpUrlField(required=False)

    def validate_image_urls(self, urls):
        return [_checked_url(url, "image_urls") for url in urls]

    def validate_callback_url(self, value):
        return _checked_url(value, "callback_url", "invalid_callback_url")

    def validate_image_callback_url(self, value):
        return _checked_url(value, "image_callback_url", "invalid_callback_url")

    def validate(self, attrs):
        count = len(attrs.get("images", [])) + len(attrs.get("image_urls", []))
        if count == 0:
            raise serializers.ValidationError({"images": "send at least one image or image_url"})
        if count > settings.MAX_BATCH_IMAGES:
            raise serializers.ValidationError({"images": f"at most {settings.MAX_BATCH_IMAGES} images a batch"})
        return super().validate(attrs)


KEYPOINTS = ("left_eye", "right_eye", "nose", "mouth", "mouth_left", "mouth_right", "left_ear", "right_ear")


POSE = ("yaw", "pitch", "roll")
QUALITY = ("sharpness", "brightness", "contrast", "ipd")


def _ordered(values, names):
    """A stored JSON object in the SPEC's order (jsonb keeps none); None for faces stored before it."""
    return None if values is None else {name: values[name] for name in names if name in values}


class FaceSerializer(serializers.Serializer):
    def to_representation(self, face):
        return {
            "box": {"x": face.x, "y": face.y, "width": face.width, "height": face.height},
            "confidence": round(face.confidence, 6),
            # The engine's own keypoints (SPEC 2.1: MTCNN's mouth corners, BlazeFace's mouth and
            # ears), in a fixed order: PostgreSQL's jsonb keeps none.
            "keypoints": {name: {"x": face.keypoints[name][0], "y": face.keypoints[name][1]}
                          for name in KEYPOINTS if name in face.keypoints},
            "pose": _ordered(face.pose, POSE),
            "quality": _ordered(face.quality, QUALITY),
        }


class ImageSerializer(serializers.ModelSerializer):
    """The image resource of the SPEC (section 2)."""

    error = serializers.SerializerMethodField()
    face_count = serializers.SerializerMethodField()
    faces = serializers.SerializerMethodField()
    original_url = serializers.SerializerMethodField()
    annotated_url = serializers.SerializerMethodField()
    callback = serializers.SerializerMethodField()
    timings_ms = schema.Timings(read_only=True)
    image_url = serializers.SerializerMethodField()

    class Meta:
        model = Image
        fields = [
            "id", "request_id", "status", "error", "image_url", "batch", "engine", "width", "height", "face_count", "faces",
            "annotation",
            "min_face_size", "min_confidence", "original_url", "annotated_url", "callback",
            "created_at", "started_at", "finished_at", "timings_ms",
        ]

    _kept = threading.local()

    @classmethod
    def represent(cls, image, context):
        """`cls(image, context=context).data`, from one serializer kept per thread: a
        ModelSerializer builds and binds its fields anew for every instance, which was 1.3 ms of
        the 10 ms of CPU an upload takes. Its fields hold no per-image state; only the context
        (the request, for absolute URLs) changes."""
        serializer = getattr(cls._kept, "serializer", None)
        if serializer is None:
            serializer = cls._kept.serializer = cls()
        serializer._context = context
        try:
            return serializer.to_representation(image)
        finally:
            serializer._context = {}

    def _done(self, image):
        return image.status == Image.Status.DONE

    @extend_schema_field(schema.ErrorDetail(allow_null=True, help_text="set when status is failed"))
    def get_error(self, image):
        if image.status != Image.Status.FAILED:
            return None
        return {"code": image.error_code, "message": image.error_message}

    @extend_schema_field(serializers.URLField(allow_null=True, help_text="the URL it was submitted by, if any"))
    def get_image_url(self, image):
        return image.source_url or None

    @extend_schema_field(serializers.IntegerField(allow_null=True, help_text="null before done"))
    def get_face_count(self, image):
        return image.face_count if self._done(image) else None

    @extend_schema_field(schema.FaceDoc(many=True, allow_null=True, help_text="null before done"))
    def get_faces(self, image):
        if not self._done(image):
            return None
        return FaceSerializer(image.faces.all(), many=True).data

    @extend_schema_field(serializers.URLField())
    def get_original_url(self, image):
        return self._url("image-original", image)

    @extend_schema_field(serializers.URLField(allow_null=True, help_text="null before done"))
    def get_annotated_url(self, image):
        if not self._done(image):
            return None
        return self._url("image-annotated", image)

    @extend_schema_field(schema.CallbackDoc(allow_null=True))
    def get_callback(self, image):
        return callback_state(image)

    def _url(self, name, image):
        """Absolute URL: from the request in the API, from PUBLIC_BASE_URL in a callback."""
        request = self.context.get("request")
        path = reverse(name, args=[image.pk])
        return request.build_absolute_uri(path) if request else settings.PUBLIC_BASE_URL + path


def callback_state(target):
    """The `callback` object of an image or a batch resource."""
    if not target.callback_url:
        return None
    return {
        "url": target.callback_url,
        "status": target.callback_status,
        "attempts": target.callback_attempts,
        "last_status_code": target.callback_last_status_code,
    }


class BatchSerializer(serializers.ModelSerializer):
    """The batch resource: counts by status and every image's own resource."""

    counts = serializers.SerializerMethodField()
    images = serializers.SerializerMethodField()
    callback = serializers.SerializerMethodField()

    class Meta:
        model = Batch
        fields = ["id", "status", "counts", "images", "callback", "created_at", "finished_at"]

    def _images(self, batch):
        return sorted(batch.images.all(), key=lambda image: image.created_at)

    @extend_schema_field(schema.Counts())
    def get_counts(self, batch):
        counts = dict.fromkeys(Image.Status.values, 0)
        for image in self._images(batch):
            counts[image.status] += 1
        return {"total": sum(counts.values()), **counts}

    @extend_schema_field(ImageSerializer(many=True))
    def get_images(self, batch):
        return ImageSerializer(self._images(batch), many=True, context=self.context).data

    @extend_schema_field(schema.CallbackDoc(allow_null=True))
    def get_callback(self, batch):
        return callback_state(batch)


# The callback events, documented as the schema's webhooks (SPECTACULAR_SETTINGS["WEBHOOKS"]).
IMAGE_EVENT, BATCH_EVENT = schema.webhooks()
