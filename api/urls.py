"""Routes of /api/v1/."""

from django.urls import path, re_path
from rest_framework.routers import SimpleRouter

from . import views

router = SimpleRouter()
router.register("images", views.ImageViewSet, basename="image")
router.register("batches", views.BatchViewSet, basename="batch")

# The SPEC names the downloads without a trailing slash; one is tolerated.
IMAGE = rf"^images/(?P<pk>{views.UUID_PATTERN})"

urlpatterns = [
    path("health/", views.HealthView.as_view(), name="health"),
    re_path(IMAGE + r"/original/?$", views.ImageViewSet.as_view({"get": "original"}), name="image-original"),
    re_path(IMAGE + r"/annotated/?$", views.ImageViewSet.as_view({"get": "annotated"}), name="image-annotated"),
    *router.urls,
]
