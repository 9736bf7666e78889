"""OpenAPI documentation of the API (drf-spectacular): the shapes the views produce by hand, the
error body, and the callback events, so /api/schema/ describes exactly what integrators get."""

import copy
import functools

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import (
    OpenApiCallback,
    OpenApiParameter,
    OpenApiResponse,
    OpenApiWebhook,
    extend_schema,
    inline_serializer,
)
from rest_framework import serializers

from .models import CallbackStatus, Image


class ErrorDetail(serializers.Serializer):
    code = serializers.CharField(help_text="invalid_request, invalid_image, invalid_callback_url, not_authenticated, "
                                           "not_found, conflict, not_ready, image_too_large, throttled, service_unavailable")
    message = serializers.CharField()
    details = serializers.DictField(help_text="e.g. the offending field")


class Error(serializers.Serializer):
    error = ErrorDetail()


class Point(serializers.Serializer):
    x = serializers.IntegerField()
    y = serializers.IntegerField()


class Box(Point):
    width = serializers.IntegerField()
    height = serializers.IntegerField()


class Keypoints(serializers.Serializer):
    """Eyes and nose from every engine; the rest depends on the engine (image-left/right)."""

    left_eye = Point()
    right_eye = Point()
    nose = Point()
    mouth = Point(required=False, help_text="blazeface")
    mouth_left = Point(required=False, help_text="mtcnn")
    mouth_right = Point(required=False, help_text="mtcnn")
    left_ear = Point(required=False, help_text="blazeface")
    right_ear = Point(required=False, help_text="blazeface")


def _degrees(limit, text):
    return serializers.FloatField(min_value=-limit, max_value=limit, help_text=f"degrees, -{limit}..{limit}: {text}")


def _unit(text):
    return serializers.FloatField(min_value=0, max_value=1, help_text=f"0..1: {text}")


class Pose(serializers.Serializer):
    """Head pose, estimated from the face's keypoints with a generic 3D face."""

    yaw = _degrees(90, "positive when the face is turned towards the image's right, near 0 for a frontal face; "
                       "changes sign in a mirrored photo")
    pitch = _degrees(90, "positive when the face looks up")
    roll = _degrees(180, "the angle of the eye line, positive counter-clockwise (the image-right eye higher): "
                         "turning the photo counter-clockwise by t degrees adds t; changes sign in a mirrored photo")


class Quality(serializers.Serializer):
    """How usable the face's pixels are, and the distance between its eyes."""

    sharpness = _unit("falls as the face is blurred (Laplacian energy relative to the face's contrast, at a fixed "
                      "face size)")
    brightness = _unit("mean luma of the face's box; falls as the face is darkened")
    contrast = _unit("RMS contrast: standard deviation of the face box's luma (0..0.5 in practice)")
    ipd = serializers.FloatField(min_value=0, help_text="inter-pupillary distance: pixels between the eye centres, "
                                                        "in the original image")


class FaceDoc(serializers.Serializer):
    box = Box(help_text="pixels of the upright image (EXIF orientation applied)")
    confidence = serializers.FloatField()
    keypoints = Keypoints()
    pose = Pose(allow_null=True, help_text="null on faces found before pose was computed")
    quality = Quality(allow_null=True, help_text="null on faces found before quality was computed")


class CallbackDoc(serializers.Serializer):
    url = serializers.URLField()
    status = serializers.ChoiceField(CallbackStatus.choices)
    attempts = serializers.IntegerField()
    last_status_code = serializers.IntegerField(allow_null=True)


class Timings(serializers.Serializer):
    queued = serializers.IntegerField(allow_null=True)
    detect = serializers.IntegerField(allow_null=True)
    total = serializers.IntegerField(allow_null=True)


class Counts(serializers.Serializer):
    total = serializers.IntegerField()
    queued = serializers.IntegerField()
    processing = serializers.IntegerField()
    done = serializers.IntegerField()
    failed = serializers.IntegerField()


ERRORS = {
    400: OpenApiResponse(Error, description="invalid_request, invalid_image or invalid_callback_url"),
    401: OpenApiResponse(Error, description="not_authenticated"),
    404: OpenApiResponse(Error, description="not_found (including another client's image)"),
    429: OpenApiResponse(Error, description="throttled; see Retry-After"),
    503: OpenApiResponse(Error, description="service_unavailable"),
}
SIGNATURE_HEADERS = (
    "Standard Webhooks 1.0 headers: webhook-id (the same on every retry of one event), "
    "webhook-timestamp (Unix seconds), webhook-signature: v1,base64(HMAC-SHA256(key, "
    "'{webhook-id}.{webhook-timestamp}.{raw body}')) with key = base64-decoded secret after 'whsec_'. "
    "Any 2xx is delivered; 410 stops delivery; anything else is retried on CALLBACK_RETRY_DELAYS."
)


def _event(name, data_serializer, event_types):
    return inline_serializer(name, {
        "type": serializers.ChoiceField(event_types),
        "timestamp": serializers.DateTimeField(),
        "data": data_serializer(),
    })


@functools.cache
def _image_event():
    from .serializers import ImageSerializer

    return _event("ImageEvent", ImageSerializer, ["image.done", "image.failed"])


@functools.cache
def _batch_event():
    from .serializers import BatchSerializer

    return _event("BatchEvent", BatchSerializer, ["batch.done"])


def image_callbacks():
    return [OpenApiCallback(
        "imageEvent", "{$request.body#/callback_url}",
        extend_schema(summary="image.done / image.failed", description=SIGNATURE_HEADERS, request=_image_event(),
                      responses={200: None}),
    )]


def webhooks():
    """The callback events, listed for SPECTACULAR_SETTINGS["WEBHOOKS"]."""
    return [
        OpenApiWebhook("image_event", extend_schema(summary="image.done / image.failed", description=SIGNATURE_HEADERS,
                                                    request=_image_event(), responses={200: None})),
        OpenApiWebhook("batch_event", extend_schema(summary="batch.done", description=SIGNATURE_HEADERS,
                                                    request=_batch_event(), responses={200: None})),
    ]


LIST_FILTERS = [
    OpenApiParameter("status", str, enum=Image.Status.values, description="only images in this status"),
    OpenApiParameter("request_id", {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[^\\x00-\\x1f\\x7f]*$"},
                     description="only the image with this request_id"),
]


class Health(serializers.Serializer):
    status = serializers.ChoiceField(["ok", "unavailable"])
    checks = inline_serializer("HealthChecks", {
        name: serializers.CharField(help_text='"ok" or "error: <kind>"') for name in ("database", "broker", "storage")
    })


class ApiKeyScheme(OpenApiAuthenticationExtension):
    """How ApiKeyAuthentication appears in the schema (defining the class registers it)."""

    target_class = "api.auth.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer",
                "description": "Authorization: Bearer <api_key> (from `manage.py create_client`)"}


# The photo types an upload may carry (the real type is read from the bytes).
IMAGE_TYPES = "image/jpeg, image/png, image/webp, image/bmp"


def postprocess(result, generator, request, public):
    """SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"]: what the serializers cannot say. A submission
    names its photos one way (files or URLs); JSON bodies carry URLs only; file parts are images;
    and links lead from a created image or batch to the operations that take its id, as an
    integrator (or schemathesis's stateful phase) follows them."""
    schemas = result["components"]["schemas"]
    operations = {operation["operationId"]: operation
                  for item in result["paths"].values() for operation in item.values() if isinstance(operation, dict)}

    upload = schemas["ImageUploadRequest"]
    upload["properties"]["image"]["minLength"] = 1  # an empty file is no photo (invalid_image)
    upload["oneOf"] = [{"required": ["image"]}, {"required": ["image_url"]}]
    schemas["ImageUrlUploadRequest"] = _without(upload, "image", required="image_url",
                                                description="POST /api/v1/images/ as JSON: an image_url to fetch.")
    batch = schemas["BatchSubmitRequest"]
    batch["properties"]["images"]["items"]["minLength"] = 1
    batch["anyOf"] = [{"required": [name], "properties": {name: {"minItems": 1}}} for name in ("images", "image_urls")]
    schemas["BatchUrlSubmitRequest"] = _without(batch, "images", required="image_urls",
                                                description="POST /api/v1/batches/ as JSON: image_urls to fetch.")
    schemas["BatchUrlSubmitRequest"]["properties"]["image_urls"]["minItems"] = 1

    for operation_id, component, files in (("v1_images_create", "ImageUrlUploadRequest", "image"),
                                           ("v1_batches_create", "BatchUrlSubmitRequest", "images")):
        operations[operation_id]["requestBody"]["required"] = True
        content = operations[operation_id]["requestBody"]["content"]
        content["application/json"]["schema"] = {"$ref": f"#/components/schemas/{component}"}
        content["multipart/form-data"]["encoding"] = {files: {"contentType": IMAGE_TYPES}}

    image_links = {
        "GetImage": "v1_images_retrieve", "DeleteImage": "v1_images_destroy",
        "GetOriginal": "v1_images_original_retrieve", "GetAnnotated": "v1_images_annotated_retrieve",
    }
    for status in ("202", "200"):
        operations["v1_images_create"]["responses"][status]["links"] = {
            name: {"operationId": target, "parameters": {"id": "$response.body#/id"}}
            for name, target in image_links.items()
        }
    operations["v1_batches_create"]["responses"]["202"]["links"] = {
        "GetBatch": {"operationId": "v1_batches_retrieve", "parameters": {"id": "$response.body#/id"}},
        "GetFirstImage": {"operationId": "v1_images_retrieve", "parameters": {"id": "$response.body#/images/0/id"}},
    }
    return result


def _without(component, field, required, description):
    properties = {name: copy.deepcopy(value) for name, value in component["properties"].items() if name != field}
    return {"type": "object", "description": description, "properties": properties, "required": [required]}
