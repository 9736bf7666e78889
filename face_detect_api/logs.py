"""Logs that carry the image id and the integrator's request_id through the API and the workers,
so one job can be followed across processes: one JSON object a line (LOG_FORMAT=json, the
default) or one line a person can read (LOG_FORMAT=text, what `make run` uses)."""

import contextvars
import logging

image_id_var = contextvars.ContextVar("image_id", default=None)
request_id_var = contextvars.ContextVar("request_id", default=None)


def bind(image_id=None, request_id=None):
    """Attach the job's identifiers to every log line of the current request or task."""
    if image_id is not None:
        image_id_var.set(str(image_id))
    if request_id is not None:
        request_id_var.set(request_id)


def clear():
    image_id_var.set(None)
    request_id_var.set(None)


class JobContextFilter(logging.Filter):
    def filter(self, record):
        record.image_id = image_id_var.get()
        record.request_id = request_id_var.get()
        return True


class TextFormatter(logging.Formatter):
    """`time process[pid] level logger: message image_id=… request_id=…`, the ids only when bound.

    A message's own line breaks are escaped so that each event stays one line; a traceback
    follows its event on the next lines, as Python prints it."""

    def __init__(self):
        super().__init__("%(asctime)s %(processName)s[%(process)d] %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record):
        line = super().formatMessage(record).replace("\r", "\\r").replace("\n", "\\n")
        for name in ("image_id", "request_id"):
            value = getattr(record, name, None)
            if value is not None:
                line += f" {name}={value}"
        return line


class ClearJobContextMiddleware:
    """A gunicorn worker reuses its thread: each request starts with no job bound."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        clear()
        return self.get_response(request)
