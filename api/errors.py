"""The one error format of the API: {"error": {"code", "message", "details"}}, for every 4xx/5xx."""

import logging

from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent
from django.db import DatabaseError
from django.http import Http404, JsonResponse
from rest_framework import exceptions, status
from rest_framework.views import exception_handler as drf_exception_handler

logger = logging.getLogger(__name__)


class ApiError(exceptions.APIException):
    """An error with the SPEC's code, message and optional details."""

    def __init__(self, status_code, code, message, details=None):
        self.status_code = status_code
        self.code = code
        self.message = message
        self.details = details or {}
        super().__init__(detail=message, code=code)


def invalid_request(message, details=None):
    return ApiError(status.HTTP_400_BAD_REQUEST, "invalid_request", message, details)


def invalid_image(message):
    return ApiError(status.HTTP_400_BAD_REQUEST, "invalid_image", message)


def image_too_large(message):
    return ApiError(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, "image_too_large", message)


def service_unavailable(message):
    return ApiError(status.HTTP_503_SERVICE_UNAVAILABLE, "service_unavailable", message)


def not_ready(message):
    return ApiError(status.HTTP_409_CONFLICT, "not_ready", message)


def conflict(message):
    return ApiError(status.HTTP_409_CONFLICT, "conflict", message)


# DRF's own exceptions, mapped to the SPEC's codes.
_CODES = {
    exceptions.NotAuthenticated: "not_authenticated",
    exceptions.AuthenticationFailed: "not_authenticated",
    exceptions.NotFound: "not_found",
    exceptions.Throttled: "throttled",
    exceptions.ParseError: "invalid_request",
    exceptions.UnsupportedMediaType: "invalid_request",
    exceptions.ValidationError: "invalid_request",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.NotAcceptable: "not_acceptable",
    exceptions.PermissionDenied: "permission_denied",
}


def body(code, message, details=None):
    return {"error": {"code": code, "message": message, "details": details or {}}}


def exception_handler(exc, context):
    """DRF's EXCEPTION_HANDLER: every error leaves in the SPEC's shape."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    if isinstance(exc, RequestDataTooBig | TooManyFieldsSent):
        exc = invalid_request("The form fields are too large or too many.")
    if isinstance(exc, exceptions.UnsupportedMediaType):
        exc = invalid_request("Send the image as multipart/form-data.", {"content_type": exc.detail})
    if isinstance(exc, DatabaseError):
        logger.warning("database unavailable", exc_info=exc)
        exc = service_unavailable("The database is unavailable; nothing was accepted. Try again.")

    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # unexpected: Django's 500 handler answers, in the same format

    if isinstance(exc, ApiError):
        response.data = body(exc.code, exc.message, exc.details)
    elif isinstance(exc, exceptions.ValidationError):
        response.data = body("invalid_request", _first_message(exc.detail), {"fields": exc.detail})
    else:
        code = next((c for cls, c in _CODES.items() if isinstance(exc, cls)), "error")
        response.data = body(code, str(exc.detail))
    if isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
        response.status_code = status.HTTP_401_UNAUTHORIZED
    return response


def _first_message(detail):
    if isinstance(detail, dict):
        field, messages = next(iter(detail.items()))
        return f"{field}: {_first_message(messages)}"
    if isinstance(detail, list) and detail:
        return _first_message(detail[0])
    return str(detail)


def json_404(request, exception=None):
    return JsonResponse(body("not_found", "Not found."), status=404)


def json_500(request):
    return JsonResponse(body("internal_error", "Internal server error."), status=500)


def json_400(request, exception=None):
    return JsonResponse(body("invalid_request", "Bad request."), status=400)
