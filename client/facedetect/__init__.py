"""Client for the face detection platform: the REST API (`Client`), callback verification
(`verify_webhook`) and the `facedetect` command line."""

from .api import ApiError, Client, FaceDetectError, TransportError
from .webhooks import WebhookVerificationError, verify_webhook

__version__ = "0.1.0"

__all__ = [
    "ApiError",
    "Client",
    "FaceDetectError",
    "TransportError",
    "WebhookVerificationError",
    "__version__",
    "verify_webhook",
]
