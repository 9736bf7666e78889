"""Routes of /api/v1/."""

from django.urls import path
from rest_framework.routers import SimpleRouter

from . import views

router = SimpleRouter()
router.register("images", views.ImageViewSet, basename="image")

urlpatterns = [
    path("health/", views.HealthView.as_view(), name="health"),
    *router.urls,
]
