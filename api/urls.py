"""Routes of /api/v1/."""

from django.urls import path
from rest_framework.routers import SimpleRouter

from . import views

router = SimpleRouter()
router.register("images", views.ImageViewSet, basename="image")
router.register("batches", views.BatchViewSet, basename="batch")


urlpatterns = [
    path("health/", views.HealthView.as_view(), name="health"),
    # The SPEC names the downloads without a trailing slash.
    path("images/<uuid:pk>/original", views.ImageViewSet.as_view({"get": "original"}), name="image-original"),
    path("images/<uuid:pk>/annotated", views.ImageViewSet.as_view({"get": "annotated"}), name="image-annotated"),
    *router.urls,
]
