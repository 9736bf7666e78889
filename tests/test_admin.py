"""The operators' admin: list, filters, search, the detail page and its actions."""

import pytest
from django.contrib.auth.models import User

from api import storage
from api.models import CallbackAttempt, Face, Image
from tests.conftest import photo

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def operator(client):
    user = User.objects.create_superuser("ops", "ops@example.com", "pw-for-tests-only")
    client.force_login(user)
    return client


@pytest.fixture
def done_image(integrator):
    image = Image.objects.create(
        client=integrator[0], request_id="r-1", original_key="originals/a.jpg", sha256="0" * 64, size_bytes=10,
        format="JPEG", width=500, height=614, status="done", face_count=1, annotated_key="annotated/a.jpg",
        callback_url="http://127.0.0.1:9/hook", callback_status="delivered", callback_event_id="msg_1",
    )
    Face.objects.create(image=image, index=0, x=1, y=2, width=30, height=40, confidence=0.99, keypoints={"nose": [5, 6]})
    CallbackAttempt.objects.create(image=image, event_id="msg_1", number=1, status_code=200, latency_ms=12)
    storage.put("annotated/a.jpg", photo("clm_cage.jpg"))
    return image


def test_the_list_shows_images_with_filters_and_search(operator, done_image):
    page = operator.get("/admin/api/image/", {"status__exact": "done", "callback_status__exact": "delivered", "q": "r-1"})
    assert page.status_code == 200
    html = page.content.decode()
    assert str(done_image.pk) in html
    assert "r-1" in html

    assert str(done_image.pk) not in operator.get("/admin/api/image/", {"status__exact": "failed"}).content.decode()
    assert str(done_image.pk) in operator.get("/admin/api/image/", {"engine__exact": "mtcnn"}).content.decode()
    assert str(done_image.pk) not in operator.get("/admin/api/image/", {"engine__exact": "blazeface"}).content.decode()
    assert str(done_image.pk) in operator.get("/admin/api/image/", {"q": str(done_image.pk)}).content.decode()


def test_the_detail_page_shows_faces_attempts_and_a_preview(operator, done_image):
    page = operator.get(f"/admin/api/image/{done_image.pk}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert f'src="/admin/api/image/{done_image.pk}/annotated/800/"' in html
    assert "msg_1" in html
    assert "0.99" in html


def test_the_face_inline_shows_pose_and_quality_columns(operator, done_image):
    Face.objects.create(image=done_image, index=1, x=5, y=6, width=70, height=80, confidence=0.97, keypoints={},
                        pose={"yaw": -12.5, "pitch": 3.25, "roll": 7.75},
                        quality={"sharpness": 0.625, "brightness": 0.4375, "contrast": 0.1875, "ipd": 31.5})
    html = operator.get(f"/admin/api/image/{done_image.pk}/change/").content.decode()
    for column in ("yaw", "pitch", "roll", "sharpness", "brightness", "contrast", "ipd"):
        assert f'column-{column}' in html, column
    for value in ("-12.5", "3.25", "7.75", "0.625", "0.4375", "0.1875", "31.5"):
        assert f">{value}<" in html, value


def test_the_list_shows_thumbnails_served_to_operators_only(operator, done_image, client):
    import io

    import PIL.Image

    assert f"/admin/api/image/{done_image.pk}/annotated/96/" in operator.get("/admin/api/image/").content.decode()
    thumbnail = operator.get(f"/admin/api/image/{done_image.pk}/annotated/96/")
    assert thumbnail["Content-Type"] == "image/jpeg"
    assert max(PIL.Image.open(io.BytesIO(thumbnail.content)).size) == 96

    client.logout()
    assert client.get(f"/admin/api/image/{done_image.pk}/annotated/96/").status_code == 302  # to the login page


def test_the_rerun_action_queues_a_finished_image_again(operator, done_image):
    response = operator.post("/admin/api/image/", {"action": "rerun_pipeline", "_selected_action": [str(done_image.pk)]})
    assert response.status_code == 302
    done_image.refresh_from_db()
    assert done_image.status == "queued"
    assert done_image.face_count is None
    assert not Face.objects.filter(image=done_image).exists()


def test_the_resend_action_starts_a_new_callback_event(operator, done_image):
    operator.post("/admin/api/image/", {"action": "resend_callback", "_selected_action": [str(done_image.pk)]})
    done_image.refresh_from_db()
    assert done_image.callback_status == "pending"
    assert done_image.callback_attempts == 0
    assert done_image.callback_event_id not in ("", "msg_1")


def test_client_secrets_never_show_in_the_admin(operator, integrator):
    html = operator.get(f"/admin/api/client/{integrator[0].pk}/change/").content.decode()
    assert integrator[0].webhook_secret not in html
    assert integrator[0].api_key_hash not in html
    assert integrator[1] not in html


def test_callback_endpoints_show_their_circuit_breaker_and_can_be_closed(operator):
    from django.utils import timezone

    from api.models import CallbackEndpoint

    since = timezone.now()
    endpoint = CallbackEndpoint.objects.create(
        scheme="https", host="hooks.example", port=443, state="open", consecutive_failures=7,
        last_error="timed out after 10.0 s", state_since=since, open_until=since,
    )
    html = operator.get("/admin/api/callbackendpoint/", {"state__exact": "open"}).content.decode()
    assert "https://hooks.example:443" in html and "timed out after 10.0 s" in html and ">7<" in html
    assert "hooks.example" in operator.get(f"/admin/api/callbackendpoint/{endpoint.pk}/change/").content.decode()

    operator.post("/admin/api/callbackendpoint/", {"action": "close_circuit", "_selected_action": [str(endpoint.pk)]})
    endpoint.refresh_from_db()
    assert (endpoint.state, endpoint.consecutive_failures, endpoint.open_until) == ("closed", 0, None)
