"""Top-level routes: the API under /api/v1/, the admin under /admin/."""

from django.contrib import admin
from django.urls import include, path

from api.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("api.urls")),
    # Prometheus scrapes this inside the network; do not route it from the internet.
    path("metrics", metrics_view, name="metrics"),
]

handler400 = "api.errors.json_400"
handler404 = "api.errors.json_404"
handler500 = "api.errors.json_500"
