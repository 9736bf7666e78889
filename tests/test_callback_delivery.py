"""The callbacks worker's delivery loop, run in this process against the test database and real
HTTP receivers: claims, per-endpoint caps, circuit breakers, leases, and isolation between
endpoints."""

import time
from datetime import timedelta

import pytest
from django.utils import timezone
from standardwebhooks.webhooks import Webhook

from api.models import CallbackAttempt, CallbackEndpoint, Image
from tests.conftest import wait_for
from tests.receiver import Hanging, Receiver
from workers import delivery, events

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def receivers():
    made = []

    def make(kind=Receiver):
        made.append(kind())
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.fixture
def run_loop(settings):
    """run_loop(**settings) starts a delivery loop in this process; stopped afterwards."""
    import ipaddress

    settings.CALLBACK_ALLOWED_NETWORKS = [ipaddress.ip_network("127.0.0.1/32")]
    loops = []

    def start(**overrides):
        for name, value in overrides.items():
            setattr(settings, name, value)
        loops.append(delivery.DeliveryLoop().start())
        return loops[-1]

    yield start
    for loop in loops:
        loop.stop(timeout=15)


def pending_images(client, url, count, path_prefix=""):
    """`count` finished images with a due event to `url` (+ /prefix-N when path_prefix is set)."""
    images = []
    for index in range(count):
        target = f"{url}/{path_prefix}{index}" if path_prefix else url
        images.append(Image.objects.create(
            client=client, status="done", face_count=0, width=10, height=10, format="JPEG",
            finished_at=timezone.now(), callback_url=target, **events.pending_fields(),
        ))
    return images


def statuses(images):
    return list(Image.objects.filter(pk__in=[i.pk for i in images]).values_list("callback_status", flat=True))


def test_an_event_is_delivered_signed_and_recorded(run_loop, receivers, integrator):
    client, _key = integrator
    receiver = receivers()
    (image,) = pending_images(client, receiver.url("/hook"), 1)
    run_loop()

    wait_for(lambda: statuses([image]) == ["delivered"], timeout=20, message="delivery")
    (request,) = receiver.received("/hook")
    payload = Webhook(client.webhook_secret).verify(request["body"], request["headers"])
    assert payload["type"] == "image.done" and payload["data"]["id"] == str(image.pk)
    assert payload["data"]["callback"] == {"url": image.callback_url, "status": "pending", "attempts": 1,
                                           "last_status_code": None}
    assert request["headers"]["webhook-id"] == image.callback_event_id
    attempt = CallbackAttempt.objects.get(image=image)
    assert (attempt.number, attempt.status_code, attempt.event_id) == (1, 200, image.callback_event_id)


def test_a_hanging_endpoint_holds_no_capacity_another_endpoint_needs(run_loop, receivers, client_factory):
    """More attempts hang than the whole loop may have in flight, yet another endpoint's events
    are delivered while they hang."""
    hanging = receivers(Hanging)
    fast = receivers()
    slow_client, fast_client = client_factory()[0], client_factory()[0]
    stuck = pending_images(slow_client, hanging.url(), 30)
    run_loop(CALLBACK_TIMEOUT=8.0, CALLBACK_MAX_IN_FLIGHT=12, CALLBACK_ENDPOINT_MAX_IN_FLIGHT=4)
    wait_for(lambda: hanging.open >= 4, timeout=20, message="attempts hanging")

    quick = pending_images(fast_client, fast.url("/fast"), 20)
    wait_for(lambda: statuses(quick) == ["delivered"] * 20, timeout=20, message="the other endpoint's deliveries")
    # The hanging attempts were still in flight: none of them has ended yet.
    assert hanging.open >= 4
    assert not CallbackAttempt.objects.filter(image__in=stuck).exists()
    assert hanging.most_open <= 4  # the per-endpoint cap


def test_attempts_waiting_for_room_are_not_counted_and_go_back_when_the_loop_stops(run_loop, receivers, integrator):
    hanging = receivers(Hanging)
    stuck = pending_images(integrator[0], hanging.url(), 10)
    loop = run_loop(CALLBACK_TIMEOUT=3.0, CALLBACK_ENDPOINT_MAX_IN_FLIGHT=2, CALLBACK_BREAKER_FAILURES=100)
    wait_for(lambda: hanging.open >= 2, timeout=20, message="attempts hanging")
    time.sleep(0.5)
    claimed = Image.objects.filter(pk__in=[i.pk for i in stuck], callback_attempts=1).count()
    assert 2 <= claimed <= 3 * 2  # in flight, and waiting for room: never more than three caps' worth
    assert hanging.most_open == 2

    loop.stop(timeout=15)
    # The two sent timed out and are recorded; those that waited went back as they were.
    assert CallbackAttempt.objects.filter(image__in=stuck).count() == 2
    attempts = sorted(Image.objects.filter(pk__in=[i.pk for i in stuck]).values_list("callback_attempts", flat=True))
    assert attempts == [0] * 8 + [1, 1]


def test_the_breaker_opens_skips_without_a_network_call_and_a_probe_closes_it(run_loop, receivers, integrator):
    receiver = receivers()
    failing = receiver.url("/down")
    receiver.script["/down"] = [503] * 3
    first = pending_images(integrator[0], failing, 3)
    run_loop(CALLBACK_BREAKER_FAILURES=3, CALLBACK_BREAKER_SECONDS=3.0, CALLBACK_RETRY_DELAYS=[60, 60],
             CALLBACK_ENDPOINT_MAX_IN_FLIGHT=1)
    wait_for(lambda: CallbackEndpoint.objects.filter(state="open").exists(), timeout=20, message="the breaker to open")
    endpoint = CallbackEndpoint.objects.get()
    assert (endpoint.consecutive_failures, endpoint.last_error) == (3, "HTTP 503")
    assert str(endpoint) == failing.removesuffix("/down")

    # While it is open, due attempts are recorded as not sent and rescheduled, with no request.
    later = pending_images(integrator[0], failing, 2)
    wait_for(lambda: CallbackAttempt.objects.filter(image__in=later).count() == 2, timeout=20, message="skips")
    assert len(receiver.received()) == 3
    for attempt in CallbackAttempt.objects.filter(image__in=later):
        assert attempt.status_code is None and attempt.error.startswith("not sent: circuit open")
    assert statuses(later) == ["pending", "pending"]
    assert all(i.callback_attempts == 1 for i in Image.objects.filter(pk__in=[i.pk for i in later]))

    # After the open period, one probe: it succeeds and closes the breaker.
    wait_for(lambda: timezone.now() > endpoint.open_until, timeout=10, message="the open period to pass")
    Image.objects.filter(pk__in=[i.pk for i in later]).update(callback_next_attempt_at=timezone.now())
    wait_for(lambda: statuses(later) == ["delivered"] * 2, timeout=30, message="the probe and the rest")
    endpoint.refresh_from_db()
    assert (endpoint.state, endpoint.consecutive_failures) == ("closed", 0)
    assert len(receiver.received()) == 5
    assert statuses(first) == ["pending"] * 3  # their own retries are still a minute away


def test_a_failed_probe_keeps_it_open_for_longer(run_loop, receivers, integrator):
    receiver = receivers()
    receiver.script["/down"] = [503] * 100
    pending_images(integrator[0], receiver.url("/down"), 2)
    run_loop(CALLBACK_BREAKER_FAILURES=2, CALLBACK_BREAKER_SECONDS=1.0, CALLBACK_RETRY_DELAYS=[60])
    wait_for(lambda: CallbackEndpoint.objects.filter(state="open").exists(), timeout=20, message="the breaker to open")
    opened = CallbackEndpoint.objects.get()
    probe = pending_images(integrator[0], receiver.url("/down"), 1)
    Image.objects.filter(pk=probe[0].pk).update(callback_next_attempt_at=opened.open_until + timedelta(seconds=0.1))
    wait_for(lambda: CallbackEndpoint.objects.get().failed_probes == 1, timeout=20, message="the probe")
    endpoint = CallbackEndpoint.objects.get()
    assert endpoint.state == "open" and endpoint.state_since == opened.state_since
    assert (endpoint.open_until - endpoint.last_failure_at).total_seconds() > 1.5  # twice as long
    assert len(receiver.received()) == 3


def test_skipped_attempts_count_so_an_event_fails_on_schedule(run_loop, receivers, integrator):
    receiver = receivers()
    receiver.script["/down"] = [503] * 100
    images = pending_images(integrator[0], receiver.url("/down"), 6)
    run_loop(CALLBACK_BREAKER_FAILURES=2, CALLBACK_BREAKER_SECONDS=30.0, CALLBACK_RETRY_DELAYS=[1, 1],
             CALLBACK_ENDPOINT_MAX_IN_FLIGHT=1)
    wait_for(lambda: statuses(images) == ["failed"] * 6, timeout=30, message="every event to fail")
    for image in images:
        numbers = list(CallbackAttempt.objects.filter(image=image).order_by("number").values_list("number", flat=True))
        assert numbers == [1, 2, 3]
    # Once the breaker had opened, the rest were recorded without a request.
    sent = len(receiver.received())
    assert sent < len(images)
    assert CallbackAttempt.objects.filter(image__in=images, error__startswith="not sent").count() == 18 - sent


def test_an_attempt_whose_sender_died_is_sent_again_after_its_lease(run_loop, receivers, integrator, settings):
    import ipaddress

    settings.CALLBACK_ALLOWED_NETWORKS = [ipaddress.ip_network("127.0.0.1/32")]
    receiver = receivers()
    (image,) = pending_images(integrator[0], receiver.url("/hook"), 1)
    claimed, _ = events.claim(10, 10)  # a process claims it, then dies before sending
    assert [a.number for a in claimed] == [1]
    assert events.claim(10, 10)[0] == []  # leased: nobody else takes it meanwhile
    Image.objects.filter(pk=image.pk).update(callback_next_attempt_at=timezone.now())  # the lease runs out
    run_loop()

    wait_for(lambda: statuses([image]) == ["delivered"], timeout=20, message="the attempt sent again")
    (request,) = receiver.received("/hook")
    assert request["headers"]["webhook-id"] == image.callback_event_id
    assert list(CallbackAttempt.objects.filter(image=image).values_list("number", flat=True)) == [2]


def test_a_claim_takes_a_fair_share_per_endpoint_within_its_room(integrator):
    client = integrator[0]
    pending_images(client, "http://a.example/hook", 10)
    pending_images(client, "http://b.example/hook", 10)
    pending_images(client, "http://C.example:8080/x", 3)

    rooms = {events.origin("http://c.example:8080/x"): 0, events.origin("http://b.example/hook"): 1}
    claimed, _ = events.claim(100, 4, rooms=rooms)

    by_host = {}
    for attempt in claimed:
        by_host[attempt.endpoint[1]] = by_host.get(attempt.endpoint[1], 0) + 1
    assert by_host == {"a.example": 4, "b.example": 1}


def test_an_image_deleted_while_its_attempt_was_in_flight_is_left_alone(integrator):
    (image,) = pending_images(integrator[0], "http://a.example/hook", 1)
    (attempt,), _ = events.claim(10, 10)
    image.delete()
    from workers import callbacks

    events.record([events.Outcome(attempt, timezone.now(), callbacks.DeliveryResult(200, 5, ""))])
    assert not CallbackAttempt.objects.exists()


def test_an_event_that_cannot_be_built_is_recorded_and_holds_up_no_other(run_loop, receivers, integrator,
                                                                          monkeypatch):
    from api.serializers import ImageSerializer

    receiver = receivers()
    broken, fine = pending_images(integrator[0], receiver.url("/hook"), 2)
    represent = ImageSerializer.represent.__func__

    def failing_for_one(cls, image, context):
        if image.pk == broken.pk:
            raise ValueError("a row the serializer chokes on")
        return represent(cls, image, context)

    monkeypatch.setattr(ImageSerializer, "represent", classmethod(failing_for_one))
    run_loop()

    wait_for(lambda: statuses([fine]) == ["delivered"], timeout=20, message="the other event")
    wait_for(lambda: CallbackAttempt.objects.filter(image=broken).exists(), timeout=20, message="the broken one")
    attempt = CallbackAttempt.objects.get(image=broken)
    assert attempt.error.startswith("not sent: could not build the event: ValueError")
    assert len(receiver.received()) == 1
