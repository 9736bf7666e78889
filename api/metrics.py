"""GET /metrics in Prometheus format, computed from the database and the broker at scrape time.

The database is the record of every job, so figures agree across any number of API and worker
processes on any number of machines, with no multiprocess bookkeeping.
"""

from django.conf import settings
from django.db import connection
from django.db.models import Count, Q
from django.http import HttpResponse
from kombu import Connection
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from .models import CallbackEndpoint, Image

# Seconds; detection is ~0.05-1 s per photo, end to end adds the queue wait.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
QUEUES = (*settings.DETECT_QUEUES.values(), "callbacks")
# Per-endpoint series are written for at most this many failing endpoints.
MAX_ENDPOINT_SERIES = 500


def _histogram(name, documentation, seconds_sql):
    """A histogram over finished images, its buckets counted by PostgreSQL in one query."""
    columns = ", ".join(f"count(*) filter (where {seconds_sql} <= %s)" for _ in BUCKETS)
    with connection.cursor() as cursor:
        cursor.execute(
            f"select {columns}, count(*), coalesce(sum({seconds_sql}), 0) from api_image "
            f"where status = 'done' and finished_at is not null and detect_ms is not null",
            BUCKETS,
        )
        *counts, total, total_sum = cursor.fetchone()
    buckets = [(str(bound), count) for bound, count in zip(BUCKETS, counts, strict=True)] + [("+Inf", total)]
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=float(total_sum))


def _endpoint_metrics():
    """Callback endpoints by breaker state, and each endpoint in trouble (open, or failing now):
    since when it is in its state, and its failures in a row. Healthy endpoints are only counted,
    which keeps the number of series bounded by the endpoints that fail."""
    states = GaugeMetricFamily("face_detect_callback_endpoints", "Callback endpoints by circuit-breaker state.",
                               labels=["state"])
    by_state = dict(CallbackEndpoint.objects.values_list("state").annotate(n=Count("pk")).order_by())
    for state in CallbackEndpoint.State.values:
        states.add_metric([state], by_state.get(state, 0))
    yield states

    is_open = GaugeMetricFamily("face_detect_callback_endpoint_open", "1 while an endpoint's circuit is open.",
                                labels=["endpoint"])
    since = GaugeMetricFamily("face_detect_callback_endpoint_state_since_seconds",
                              "Unix time an endpoint entered its circuit state.", labels=["endpoint", "state"])
    failures = GaugeMetricFamily("face_detect_callback_endpoint_consecutive_failures",
                                 "Timeouts, refused connections and 5xx in a row.", labels=["endpoint"])
    troubled = CallbackEndpoint.objects.filter(Q(state=CallbackEndpoint.State.OPEN) | Q(consecutive_failures__gt=0))
    for endpoint in troubled.order_by("host")[:MAX_ENDPOINT_SERIES]:
        name = str(endpoint)
        is_open.add_metric([name], 1 if endpoint.state == CallbackEndpoint.State.OPEN else 0)
        since.add_metric([name, endpoint.state], endpoint.state_since.timestamp())
        failures.add_metric([name], endpoint.consecutive_failures)
    yield is_open
    yield since
    yield failures


class PlatformCollector:
    def collect(self):
        by_status = dict(Image.objects.values_list("status").annotate(n=Count("pk")).order_by())
        images = GaugeMetricFamily("face_detect_images", "Images by pipeline status.", labels=["status"])
        for status in Image.Status.values:
            images.add_metric([status], by_status.get(status, 0))
        yield images

        submitted = GaugeMetricFamily("face_detect_images_submitted", "Images accepted and still retained.")
        submitted.add_metric([], sum(by_status.values()))
        yield submitted

        in_flight = GaugeMetricFamily("face_detect_images_in_flight", "Images queued or processing.")
        in_flight.add_metric([], by_status.get("queued", 0) + by_status.get("processing", 0))
        yield in_flight

        callbacks = GaugeMetricFamily("face_detect_callbacks", "Callback outcomes by status.", labels=["status"])
        by_callback = dict(Image.objects.values_list("callback_status").annotate(n=Count("pk")).order_by())
        for status in Image.CallbackStatus.values:
            callbacks.add_metric([status], by_callback.get(status, 0))
        yield callbacks

        yield from _endpoint_metrics()

        yield _histogram("face_detect_detection_seconds", "Detection time per image.", "detect_ms / 1000.0")
        yield _histogram(
            "face_detect_end_to_end_seconds", "From upload to done.", "extract(epoch from finished_at - created_at)"
        )

        depth = GaugeMetricFamily("face_detect_queue_depth", "Messages waiting in a RabbitMQ queue.", labels=["queue"])
        try:
            with Connection(settings.CELERY_BROKER_URL, connect_timeout=2) as conn:
                channel = conn.channel()
                for queue in QUEUES:
                    _, messages, _ = channel.queue_declare(queue, passive=True)
                    depth.add_metric([queue], messages)
        except Exception:  # broker down or queue not declared yet: report what we have
            pass
        yield depth


def metrics_view(request):
    registry = CollectorRegistry()
    registry.register(PlatformCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
