"""Fetching a photo submitted by URL: the callbacks' SSRF guard, the uploads' size limit.

Every connection, redirects included, goes through the guarded session, so a URL or a redirect
that leads to a private address is refused at connect time.
"""

import requests
from django.conf import settings

from .callbacks import BlockedAddress, find_blocked, guarded_session
from .pipeline import PipelineError

MAX_REDIRECTS = 3
CHUNK = 64 * 1024


class FetchUnavailable(Exception):
    """The remote server did not answer usefully this time: worth another try."""


def fetch(url):
    """The bytes at `url`, or PipelineError (permanent) / FetchUnavailable (transient)."""
    session = guarded_session()
    session.max_redirects = MAX_REDIRECTS
    try:
        with session.get(url, stream=True, timeout=(5, settings.FETCH_TIMEOUT),
                         headers={"user-agent": "face-detect-fetcher/1", "accept": "image/*"}) as response:
            if response.status_code >= 500 or response.status_code == 429:
                raise FetchUnavailable(f"{url} answered {response.status_code}")
            if response.status_code != 200:
                raise PipelineError("fetch_failed", f"The image URL answered {response.status_code}.")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > settings.MAX_UPLOAD_BYTES:
                raise _too_large()
            data = bytearray()
            for chunk in response.iter_content(CHUNK):
                data += chunk
                if len(data) > settings.MAX_UPLOAD_BYTES:
                    raise _too_large()
            return bytes(data)
    except requests.exceptions.TooManyRedirects:
        raise PipelineError("fetch_failed", f"The image URL redirected more than {MAX_REDIRECTS} times.") from None
    except requests.exceptions.InvalidSchema:
        raise PipelineError("fetch_failed", "The image URL redirected to a scheme other than http(s).") from None
    except requests.exceptions.ConnectionError as error:
        if _blocked(error):
            raise PipelineError("fetch_blocked", "The image URL leads to a blocked address.") from None
        raise FetchUnavailable(str(error)) from error
    except requests.exceptions.RequestException as error:
        raise FetchUnavailable(str(error)) from error
    finally:
        session.close()


def _too_large():
    return PipelineError("image_too_large", f"The image is larger than {settings.MAX_UPLOAD_BYTES} bytes.")


def _blocked(error):
    return isinstance(find_blocked(error), BlockedAddress)
