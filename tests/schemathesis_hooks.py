"""Schemathesis hooks for tests/test_api_contract.py (loaded through SCHEMATHESIS_HOOKS).

What a schema cannot say, supplied as values the contract allows: the image parts are photos of
the types the schema names (encoding contentType), and an http(s) URL that a positive case sends
points at an address the test platform may reach (127.0.0.1, its CALLBACK_ALLOWED_NETWORKS):
the SSRF guard refuses hosts that do not resolve or resolve to private addresses, which the
schema documents as a 400 but cannot express as a pattern. Negative cases are left to
schemathesis."""

import io
import os
import re
import string

import PIL.Image
import schemathesis
from hypothesis import strategies as st

# Each dropped failure is written here with its reason, for a person to check (the test sets it).
DROPPED_LOG = os.environ.get("SCHEMATHESIS_DROPPED_LOG")
FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP", "image/bmp": "BMP"}


def _encode(image_format, width, height, colour):
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (width, height), colour).save(buffer, image_format)
    return buffer.getvalue()


def _photos(image_format):
    # At least 12 px a side: the smallest image the detector can look at (MIN_IMAGE_SIDE).
    side = st.integers(min_value=12, max_value=96)
    colour = st.tuples(*[st.integers(0, 255)] * 3)
    return st.builds(_encode, st.just(image_format), side, side, colour)


for media_type, image_format in FORMATS.items():
    schemathesis.openapi.media_type(media_type, _photos(image_format))

schemathesis.openapi.format("uri", st.builds(
    "{}://127.0.0.1:{}/{}".format,
    st.sampled_from(["http", "https", "HTTP"]),
    st.integers(min_value=1, max_value=65535),
    st.text(alphabet=string.ascii_letters + string.digits + "-._~/?=&", max_size=60),
))


# A URL field's refusal by the SSRF guard: the host does not resolve, resolves to a blocked address,
# or has a port or name no connection could use. The pattern mismatch (_checked_url's own first
# message) is not in this list: a schema-valid URL never gets it.
GUARD_REFUSAL = re.compile(r"(image_urls?|callback_url|image_callback_url) is refused: (?!the (image|callback) URL must be an http)")


UNNAMED_FORM_MUTATION = re.compile(r"Invalid component: (in body - multipart body with custom encoding|positive test case)$",
                                   re.MULTILINE)


@schemathesis.hook
def before_call(context, case, kwargs):
    """A batch's `images` drawn from the media-type strategies comes as one file instead of a list
    of one, which schemathesis then sends without a filename: as a form field, not a file. A list
    is what the schema says and what browsers and `curl -F images=@…` send."""
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    # A negative case may be that very single value: it stays as drawn.
    if positive and isinstance(case.body, dict) and "images" in case.body and not isinstance(case.body["images"], list):
        case.body["images"] = [case.body["images"]]


@schemathesis.hook
def filter_failure(context, failure, case, response):
    """Keep every failure but those that are not differences between schema and behaviour:

    - a schema-valid URL whose host the SSRF guard refuses. That 400 (invalid_callback_url, or
      invalid_request for an image URL) is the documented answer to where a host resolves, which
      no schema can state;
    - a photo part that is no photo: the schema names the parts' types (encoding contentType) and
      the strategies above draw real photos, but some of schemathesis's paths draw arbitrary
      bytes; invalid_image is right for those (a real photo refused still fails the run);
    - a "negative" form whose fault does not survive multipart: a part cannot carry a null (what is
      sent is the text "null", a valid string), and one file and a list of one are the same parts.
      Schemathesis then names no invalid component ("multipart body with custom encoding",
      "positive test case"), and what reached the server was valid. A form whose invalid part
      schemathesis names is still checked, and so is every JSON body."""
    reason = _dropped(failure, case, response)
    if reason and DROPPED_LOG:
        with open(DROPPED_LOG, "a") as log:
            log.write(f"{failure.code} {case.operation.label} {response.status_code}: {reason}\n")
    return reason is None


def _dropped(failure, case, response):
    """Why a failure is not a difference between schema and behaviour, or None."""
    if failure.code == "ST201" and _is_form(case):
        if _form_with_null(case):
            return "form with a null"
        if UNNAMED_FORM_MUTATION.search(failure.message):
            return "form mutation that multipart erases"
    if failure.code != "ST202" or response.status_code != 400:
        return None
    if _error_code(response) == "invalid_image" and not all(_is_a_photo(data) for data in _sent_files(case)):
        return "invalid_image for bytes that are no photo"
    message = _error(response).get("message", "")
    return f"SSRF guard: {message}" if GUARD_REFUSAL.match(message) else None




def _error(response):
    try:
        return response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return {}


def _error_code(response):
    return _error(response).get("code")


def _is_form(case):
    return str(case.media_type or "").startswith("multipart/") and isinstance(case.body, dict)


def _form_with_null(case):
    values = [item for value in case.body.values() for item in (value if isinstance(value, list) else [value])]
    return any(value is None for value in values)


def _is_a_photo(data):
    """Whether `data` decodes as one of the photo types the schema names."""
    if not isinstance(data, bytes | bytearray):
        data = getattr(data, "data", None)
    if not isinstance(data, bytes | bytearray):
        return False
    try:
        with PIL.Image.open(io.BytesIO(data)) as picture:
            picture.load()
            return picture.format in FORMATS.values()
    except Exception:
        return False


def _sent_files(case):
    files = case.body.get("image", case.body.get("images")) if isinstance(case.body, dict) else None
    return files if isinstance(files, list) else [files]
