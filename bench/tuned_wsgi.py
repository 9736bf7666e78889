"""WSGI entry of `bench.ingest`'s tuned variant: the platform with bench/tuned_patches.py applied."""

import os

os.environ["DJANGO_SETTINGS_MODULE"] = "bench.tuned_settings"

from django.core.wsgi import get_wsgi_application

application = get_wsgi_application()

from bench import tuned_patches

tuned_patches.apply()
