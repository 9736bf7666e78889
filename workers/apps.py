from django.apps import AppConfig


class WorkersConfig(AppConfig):
    name = "workers"

    def ready(self):
        from . import signals  # noqa: F401  (worker process hooks)
