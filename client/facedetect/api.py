"""The platform's REST API (`/api/v1/`) as Python calls: submit a photo, follow it, list, download
its output and delete it. Every error answer becomes an `ApiError`."""

import contextlib
import io
import os
import random
import re
import secrets
import time
from pathlib import Path
from urllib.parse import quote, urljoin

import requests

__all__ = ["FINAL_STATUSES", "ApiError", "Client", "FaceDetectError", "TransportError"]

USER_AGENT = "facedetect-client/0.1.0"
FINAL_STATUSES = ("done", "failed")
DOWNLOADS = ("annotated", "original")
# Answers a poll may simply ask again after: the service is busy or briefly unreachable.
TRANSIENT_STATUSES = (429, 502, 503, 504)


class FaceDetectError(Exception):
    """Base of the errors this package raises about the service."""


class ApiError(FaceDetectError):
    """The API answered with an error: `status` (HTTP), and the SPEC's `code`, `message`, `details`."""

    def __init__(self, status, code, message, details=None, retry_after=None):
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.retry_after = retry_after
        super().__init__(f"{status} {code}: {message}")


class TransportError(FaceDetectError):
    """The service could not be reached, or did not answer in time."""


class Client:
    """An integrator's session with the API at `base_url`, authenticated with `api_key`.

    `timeout` (seconds) bounds each HTTP request; `wait()` has its own overall limit.
    """

    def __init__(self, base_url, api_key, timeout=30):
        if not api_key:
            raise ValueError("api_key is required")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.session.headers["User-Agent"] = USER_AGENT
        self.session.headers["Accept"] = "application/json"

    def __repr__(self):
        return f"Client({self.base_url!r})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.session.close()

    # --- images ---

    def submit(self, path_or_bytes, request_id=None, callback_url=None, min_face_size=None, min_confidence=None,
               annotation=None, engine=None):
        """Upload a photo (a path, bytes or a binary file object); returns the image resource.

        `engine` picks the detector: "mtcnn" (the server's default) or "blazeface" (several times
        faster); each has its own default `min_confidence`.

        A new image comes back `queued` (HTTP 202). Re-sending the same bytes with the same
        `request_id` is safe: it returns the existing image (HTTP 200) and starts no new job.
        """
        options = {
            "request_id": request_id, "callback_url": callback_url, "min_face_size": min_face_size,
            "min_confidence": min_confidence, "annotation": annotation, "engine": engine,
        }
        fields = {name: str(value) for name, value in options.items() if value is not None}
        with _opened(path_or_bytes) as (name, stream):
            # The server reads the type from the bytes, never from the name or a declared type.
            files = {"image": (name, stream, "application/octet-stream")}
            return self._request("POST", "/images/", files=files, data=fields).json()

    def get(self, image_id):
        """The image resource: status, faces (box, confidence, keypoints, pose, quality), timings,
        callback state."""
        return self._request("GET", _image_path(image_id)).json()

    def list(self, status=None, request_id=None, page=None):
        """One page of this client's images, newest first: `{"count", "next", "previous", "results"}`."""
        params = {name: value for name, value in (("status", status), ("request_id", request_id), ("page", page))
                  if value is not None}
        return self._request("GET", "/images/", params=params).json()

    def iter_images(self, status=None, request_id=None):
        """Every image of this client, newest first, page after page."""
        page = 1
        while True:
            body = self.list(status=status, request_id=request_id, page=page)
            yield from body["results"]
            if not body.get("next"):
                return
            page += 1

    def wait(self, image_id, timeout=120, initial_interval=0.5, max_interval=5.0):
        """Poll until the image is `done` or `failed` and return it; `TimeoutError` after `timeout` s.

        Intervals double from `initial_interval` up to `max_interval`, with jitter so that many
        waiting clients do not poll in step. Busy or unreachable answers (429, 502-504, connection
        errors) are waited out within the same deadline; other errors are raised at once.
        """
        deadline = time.monotonic() + timeout
        interval = initial_interval
        last_seen = "not polled yet"
        while True:
            # "Equal jitter": half the interval fixed, half random. Retry-After is a floor.
            pause = random.uniform(interval / 2, interval)
            try:
                image = self._request("GET", _image_path(image_id), timeout=_within(deadline, self.timeout)).json()
                if image.get("status") in FINAL_STATUSES:
                    return image
                last_seen = image.get("status")
            except ApiError as error:
                if error.status not in TRANSIENT_STATUSES:
                    raise
                last_seen = f"answering {error.status} {error.code}"
                pause = max(pause, error.retry_after or 0)
            except TransportError as error:
                last_seen = f"unreachable ({error})"

            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"image {image_id} was still {last_seen} after {timeout:g} s; "
                                   "it may finish later: ask again with get()")
            time.sleep(min(pause, remaining))
            interval = min(interval * 2, max_interval)

    def download(self, image_id, path, which="annotated"):
        """Save the `annotated` (default) or `original` image to `path`; returns the path.

        The API answers with the bytes or with a redirect to a short-lived presigned storage URL;
        both are handled. The file appears whole or not at all.
        """
        if which not in DOWNLOADS:
            raise ValueError(f"which must be one of {', '.join(DOWNLOADS)}")
        response = self._request("GET", f"{_image_path(image_id)}{which}", allow_redirects=False, stream=True)
        if response.is_redirect:
            response = self._follow_presigned(response)
        target = Path(path)
        # Written beside the target and renamed over it, so a broken download leaves no half file.
        partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        try:
            out = open(partial, "xb")  # noqa: SIM115 (closed by the `with` below)
        except OSError as error:
            response.close()
            raise type(error)(error.errno, error.strerror, str(target)) from None
        try:
            with out, response:
                out.writelines(response.iter_content(64 * 1024))
            os.replace(partial, target)
        except requests.RequestException as error:
            raise TransportError(f"the download of {which} for {image_id} broke off: {_reason(error)}") from error
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
        return target

    def delete(self, image_id):
        """Delete the image, its faces and its stored files."""
        self._request("DELETE", _image_path(image_id))

    def health(self):
        """The health document (`{"status", "checks"}`), healthy (200) or not (503)."""
        response = self._send("GET", "/health/", timeout=self.timeout)
        if response.status_code not in (200, 503):
            raise _api_error(response)
        return response.json()

    # --- HTTP ---

    def _follow_presigned(self, redirect):
        url = urljoin(redirect.url, redirect.headers["Location"])
        redirect.close()
        try:
            # A presigned URL carries its own credentials: the API key must not travel with it.
            response = requests.get(url, timeout=self.timeout, stream=True, headers={"User-Agent": USER_AGENT})
        except requests.RequestException as error:
            raise TransportError(f"storage could not be reached: {_reason(error)}") from error
        if response.status_code != 200:
            response.close()
            # The URL itself is a credential, so it stays out of the message.
            raise ApiError(response.status_code, "download_failed",
                           f"storage answered {response.status_code} {response.reason} to the presigned URL")
        return response

    def _request(self, method, path, timeout=None, **kwargs):
        response = self._send(method, path, timeout=timeout or self.timeout, **kwargs)
        if response.status_code >= 400:
            raise _api_error(response)
        return response

    def _send(self, method, path, timeout, **kwargs):
        url = f"{self.base_url}/api/v1{path}"
        try:
            return self.session.request(method, url, timeout=timeout, **kwargs)
        except requests.Timeout as error:
            raise TransportError(f"{method} {url}: no answer within {timeout:g} s") from error
        except requests.RequestException as error:
            raise TransportError(f"{method} {url}: {_reason(error)}") from error


def _image_path(image_id):
    return f"/images/{quote(str(image_id), safe='')}/"


def _reason(error):
    """The OS's words for a failed connection ("Connection refused"), else the whole message."""
    seen, pending = set(), [error]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        pending += [getattr(current, "reason", None), current.__cause__, current.__context__,
                    *(arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException))]
    return str(error)


def _within(deadline, limit):
    """A request timeout that neither exceeds `limit` nor runs far past the deadline."""
    return max(1.0, min(limit, deadline - time.monotonic()))


def _api_error(response):
    """The SPEC's `{"error": {"code", "message", "details"}}`, or whatever a proxy put in its place."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    retry_after = _retry_after(response.headers.get("Retry-After"))
    if isinstance(error, dict) and error.get("code"):
        return ApiError(response.status_code, str(error["code"]), str(error.get("message") or response.reason),
                        error.get("details") or {}, retry_after)
    # A proxy's error page: its words without the markup.
    text = " ".join(re.sub(r"<[^>]*>", " ", response.text or "").split())[:200]
    message = f"{response.reason or 'HTTP error'}" + (f": {text}" if text else "")
    return ApiError(response.status_code, "http_error", message, {}, retry_after)


def _retry_after(value):
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return None


@contextlib.contextmanager
def _opened(source):
    """(file name, binary stream) for a path, bytes, or an open binary file."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield "image", io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as stream:
            yield os.path.basename(os.fspath(source)) or "image", stream
    elif hasattr(source, "read"):
        yield os.path.basename(str(getattr(source, "name", "") or "")) or "image", source
    else:
        raise TypeError(f"expected a path, bytes or a binary file, not {type(source).__name__}")
