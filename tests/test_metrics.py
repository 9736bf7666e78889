"""/metrics: Prometheus text computed from the database and the broker."""

from datetime import timedelta

import pytest
from django.test import Client as HttpClient
from prometheus_client.parser import text_string_to_metric_families

from api.models import Image
from tests.conftest import upload

pytestmark = pytest.mark.django_db(transaction=True)


def scrape():
    response = HttpClient().get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_it_counts_images_by_status_and_measures_latency(api):
    first = upload(api, "clm_cage.jpg").json()["id"]
    upload(api, "clm_audrey.jpg")
    image = Image.objects.get(pk=first)
    Image.objects.filter(pk=first).update(
        status="done", detect_ms=300, finished_at=image.created_at + timedelta(seconds=2)
    )

    samples = scrape()

    assert samples[("face_detect_images", (("status", "done"),))] == 1
    assert samples[("face_detect_images", (("status", "queued"),))] == 1
    assert samples[("face_detect_images_in_flight", ())] == 1
    assert samples[("face_detect_detection_seconds_bucket", (("le", "0.25"),))] == 0
    assert samples[("face_detect_detection_seconds_bucket", (("le", "0.5"),))] == 1
    assert samples[("face_detect_end_to_end_seconds_bucket", (("le", "2.5"),))] == 1
    assert samples[("face_detect_detection_seconds_sum", ())] == pytest.approx(0.3)
    assert ("face_detect_queue_depth", (("queue", "detect"),)) in samples


def test_it_shows_callback_endpoints_by_breaker_state_and_those_in_trouble():
    from django.utils import timezone

    from api.models import CallbackEndpoint

    since = timezone.now()
    CallbackEndpoint.objects.create(scheme="https", host="down.example", port=443, state="open",
                                    consecutive_failures=9, last_error="HTTP 503", state_since=since, open_until=since)
    CallbackEndpoint.objects.create(scheme="http", host="flaky.example", port=8080, consecutive_failures=2)
    CallbackEndpoint.objects.create(scheme="https", host="fine.example", port=443)

    samples = scrape()

    assert samples[("face_detect_callback_endpoints", (("state", "open"),))] == 1
    assert samples[("face_detect_callback_endpoints", (("state", "closed"),))] == 2
    down = (("endpoint", "https://down.example:443"),)
    assert samples[("face_detect_callback_endpoint_open", down)] == 1
    assert samples[("face_detect_callback_endpoint_consecutive_failures", down)] == 9
    assert samples[("face_detect_callback_endpoint_state_since_seconds",
                    (("endpoint", "https://down.example:443"), ("state", "open")))] == pytest.approx(since.timestamp())
    assert samples[("face_detect_callback_endpoint_open", (("endpoint", "http://flaky.example:8080"),))] == 0
    assert not any(labels and dict(labels).get("endpoint", "").startswith("https://fine") for _, labels in samples)
