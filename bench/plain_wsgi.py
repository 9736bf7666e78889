"""WSGI entry of the baseline for `bench.ingest` (`gunicorn bench.plain_wsgi:application`)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ["DJANGO_SETTINGS_MODULE"] = "bench.plain_settings"

application = get_wsgi_application()
